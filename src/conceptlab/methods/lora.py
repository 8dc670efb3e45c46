"""LoRA (Hu et al. 2021) as diffusers trains it for Stable Diffusion: low-rank adapters on the UNet's
attention projections (and optionally the text encoder's), built with peft; only the adapters train.

Files: the kohya / AUTOMATIC1111 layout (`concepts/<concept>.safetensors`: `lora_unet_<module>` and
`lora_te_<module>` keys with `.lora_down.weight`, `.lora_up.weight` and `.alpha`), which drops into
the webui's or ComfyUI's `models/Lora/` and works as `<lora:<concept>:0.8>`; and diffusers' own
(`concepts/diffusers/pytorch_lora_weights.safetensors`, `pipe.load_lora_weights(folder)`). On SDXL the
UNet's modules go by their names in the original layout (`lora_unet_input_blocks_4_1_...`) and the text
encoders' by `lora_te1_` / `lora_te2_`, as kohya writes them.
At inference a LoRA is loaded with diffusers' loader and scaled with peft's, so `<lora:name:0>` is
exactly the bare model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..backbone import PIPELINES, Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, one_line, read_tensor_file, write_safetensors
from ..layouts import original_unet_name
from .base import Concept, Method, MethodConfig, method_key
from .lycoris import (
    NAMES,
    VARIANTS,
    WeightChange,
    file_rank,
    file_variant,
    has_rank,
    layer_tensors,
    weight_change,
)

# peft and diffusers load inside the functions that use them, not here: importing them costs peft ~6 s, diffusers ~5 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

ADAPTER = "conceptlab"  # the adapter's name inside the backbone while training
# Each part's key prefix in kohya's layout: SD's, and SDXL's (two text encoders).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_XL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_STARTS = tuple(sorted({*KOHYA_PREFIXES.values(), *KOHYA_XL_PREFIXES.values()}))
BUNDLE_PREFIX = "bundle_emb."  # an embedding inside a LoRA file (the webui reads it with the LoRA)


def kohya_key(backbone: Backbone, part: str, module_name: str) -> str:
    """A module's name in kohya's layout: diffusers/transformers names with '_' (SDXL's UNet: the original
    layout's names, `layouts`). The text encoders' modules are named from CLIPTextModel's `text_model`
    down, as in SD's original text encoder (transformers 5 dropped that level from CLIPTextModel's own
    names)."""
    if part.startswith("text_encoder") and not module_name.startswith("text_model."):
        module_name = f"text_model.{module_name}"
    if part == "unet" and backbone.is_xl:
        module_name = original_unet_name(module_name, backbone.unet.config)
    return (KOHYA_XL_PREFIXES if backbone.is_xl else KOHYA_PREFIXES)[part] + module_name.replace(".", "_")


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA: low-rank adapters on the attention projections; only the adapters train."""

    _target_: str = "conceptlab.methods.lora.LoRA"
    name: str = method_key("name", "lora")
    variant: str = opt(
        "lora",
        "lora | loha (Hadamard product of two low-rank pairs) | lokr (Kronecker product) | dora (LoRA with a learned "
        "magnitude per output row): peft's own, written in the kohya/LyCORIS layout the webui and ComfyUI read",
    )
    rank: int = opt(4, "the adapters' rank", valid="[1, inf)")
    alpha: float | None = opt(
        None, "scale numerator: the update is (alpha / rank) B A; null = rank (scale 1)", valid="(0, inf)"
    )
    target_modules: list[str] = opt(
        ["to_k", "to_q", "to_v", "to_out.0"], "UNet modules that get adapters", nonempty=True
    )
    dropout: float = opt(0.0, "dropout on the adapters' input while training", valid="[0, 1)")
    text_encoder: bool = opt(
        False, "also adapt the text encoders' attention (q_proj k_proj v_proj out_proj; SDXL: both encoders)"
    )
    init_from: str | None = method_key(
        "init_from", None, "continue from a LoRA file (kohya/A1111 or diffusers .safetensors)"
    )
    lr: Any = method_key("lr", 1.0e-4, 'learning rate, or a schedule "1e-4:1000, 5e-5"')


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_layers(backbone: Backbone, adapter: str | None) -> Iterator[tuple[str, str, nn.Module]]:
    """(part, module name, layer) for every peft LoRA, LoHa or LoKr layer of the UNet and text encoders
    that holds `adapter` (None: every such layer)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    for part in ("unet", *backbone.text_parts):
        for name, module in getattr(backbone, part).named_modules():
            if isinstance(module, LoraLayer | LycorisLayer) and (
                adapter is None or adapter in module.scaling
            ):
                yield part, name, module


def peft_config(variant: str, rank: int, alpha: float, dropout: float, targets: list[str]):
    """peft's config of the variant: LoRA (DoRA: use_dora) or its LoHa / LoKr."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if variant == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if variant == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets, use_dora=variant == "dora")  # fmt: skip


class LoRA(Method):
    """Train low-rank adapters of the UNet's (and optionally the text encoder's) attention projections."""

    Config = LoRAConfig
    prompt_tag = "lora"
    file_formats = "kohya/AUTOMATIC1111 LoRA (.safetensors, lora_unet_ keys), diffusers LoRA (.safetensors)"

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str, rank: int = 4,
                 alpha: float | None = None, target_modules: list[str] | None = None, dropout: float = 0.0,
                 text_encoder: bool = False, init_from: str | None = None, variant: str = "lora"):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        if variant not in VARIANTS:
            raise ConfigError(f"method.variant={variant!r}: use one of {', '.join(VARIANTS)}")
        if rank < 1:
            raise ConfigError(f"method.rank={rank}: a LoRA needs rank 1 or more")
        if not 0 <= dropout < 1:
            raise ConfigError(f"method.dropout={dropout}: a probability in [0, 1)")
        if dropout and variant in ("loha", "lokr"):
            raise ConfigError(
                f"method.dropout={dropout}: the adapters' input dropout is LoRA's and DoRA's; use method.dropout=0 "
                f"with method.variant={variant}"
            )
        self.variant = variant
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.target_modules = list(target_modules or LoRAConfig().target_modules)
        self.dropout, self.text_encoder = dropout, text_encoder
        self._backbone: Backbone | None = None  # not a submodule: the adapters live inside the backbone

    @property
    def prompt_text(self) -> str:
        return self.concept  # the trigger word in captions, as kohya's and A1111's training use

    @property
    def changes_text_encoding(self) -> bool:
        return self.text_encoder

    def attach(self, backbone: Backbone) -> None:
        from peft import inject_adapter_in_model

        def config(targets: list[str]):
            return peft_config(self.variant, self.rank, self.alpha, self.dropout, targets)

        try:
            if self.variant in ("lora", "dora"):
                backbone.unet.add_adapter(config(self.target_modules), adapter_name=ADAPTER)  # diffusers' way
            else:  # diffusers' add_adapter takes LoRA configs only
                inject_adapter_in_model(config(self.target_modules), backbone.unet, adapter_name=ADAPTER)
            if self.text_encoder:  # peft's own injection (transformers' add_adapter wants a newer peft)
                for encoder in backbone.text_encoders:
                    inject_adapter_in_model(config(TEXT_ENCODER_TARGETS), encoder, adapter_name=ADAPTER)
        except ValueError as err:  # peft: a target module that does not exist
            raise ConfigError(f"method.target_modules={self.target_modules}: {err}") from err
        object.__setattr__(self, "_backbone", backbone)
        if self.init_from:
            self._load_initial(backbone)
        for _, _, layer in lora_layers(backbone, ADAPTER):
            for name, parameter in layer.named_parameters():
                if ADAPTER in name.split("."):  # the adapter's own tensors, not the frozen layer's
                    parameter.requires_grad_(True)
        self.train(self.training)

    def packed_modules(self, backbone: Backbone) -> list[str]:
        return [f"{part}.{name}" for part, name, _ in lora_layers(backbone, ADAPTER)]

    def _load_initial(self, backbone: Backbone) -> None:
        """Copy a file's adapters into ours: the same variant and rank, every one of our modules in it."""
        file = read_tensor_file(self.init_from)
        weights = kohya_tensors(file)
        if weights is None:
            raise ConceptFileError(f"{self.init_from} is not a kohya/A1111 LoRA file (lora_unet_ keys)")
        found = file_variant(weights)
        if found != self.variant:
            raise ConceptFileError(
                f"{self.init_from} is a {NAMES[found]} file and this run trains a {NAMES[self.variant]}: set "
                f"method.variant={found}"
            )
        for part, name, layer in lora_layers(backbone, ADAPTER):
            key = kohya_key(backbone, part, name)
            ours = layer_tensors(layer, ADAPTER)
            theirs = {suffix: weights.get(f"{key}.{suffix}") for suffix in ours}
            if any(t is None for t in theirs.values()):
                raise ConceptFileError(f"{self.init_from} has no adapter for {part} module {name}")
            if self.variant == "lokr" and not has_rank(ours) and f"{key}.alpha" not in weights:
                theirs["lokr_w1"] = (
                    theirs["lokr_w1"] / layer.scaling[ADAPTER]
                )  # the file carries the scale in w1
            for suffix, tensor in ours.items():
                if theirs[suffix].shape != tensor.shape:
                    rank = file_rank(theirs)
                    raise ConceptFileError(
                        f"{self.init_from}: {key} has rank {rank} ({suffix} {tuple(theirs[suffix].shape)}; this run's "
                        f"{tuple(tensor.shape)} at method.rank={self.rank}); set method.rank={rank}"
                    )
                with torch.no_grad():
                    tensor.copy_(theirs[suffix])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for _, _, layer in lora_layers(self._backbone, ADAPTER)
            for p in layer.parameters()
            if p.requires_grad
        ]

    def train(self, mode: bool = True) -> LoRA:
        super().train(mode)
        if self._backbone is not None:  # the adapters' dropout follows the method, not the frozen backbone
            for _, _, layer in lora_layers(self._backbone, ADAPTER):
                if hasattr(layer, "lora_dropout"):  # LoRA's and DoRA's (LoHa and LoKr have none here)
                    layer.lora_dropout[ADAPTER].train(mode)
        return self

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        layers = [layer for _, _, layer in lora_layers(self._backbone, ADAPTER)]
        if self.variant == "dora":
            # As the webui and ComfyUI apply DoRA: m x (the decomposed weight's change), linear in m (peft's
            # scale acts inside the normalization, and at 0 would not be the bare model).
            hooks = [layer.register_forward_hook(_interpolate(multiplier)) for layer in layers]
            try:
                yield
            finally:
                for hook in hooks:
                    hook.remove()
            return
        for layer in layers:
            layer.set_scale(ADAPTER, multiplier)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_scale(ADAPTER, 1.0)

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        kohya = write_kohya_lora(
            folder / f"{self.concept}.safetensors", backbone, ADAPTER, self.concept, step
        )
        if self.variant in ("loha", "lokr"):  # diffusers' loaders read LoRA and DoRA only
            return [kohya]
        return [kohya, write_diffusers_lora(folder / "diffusers", backbone, ADAPTER)]

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> LoRAConcept | None:
        if not file.is_safetensors or not isinstance(file.data, dict):
            return None
        keys = list(file.data)
        is_lora = any(k.startswith(KOHYA_STARTS) for k in keys) or any(
            ".lora_A." in k or ".lora.down." in k or ".lora_down." in k for k in keys
        )
        if not is_lora or any(k.startswith(BUNDLE_PREFIX) for k in keys):  # a bundle: pivotal tuning's
            return None
        # A1111 and ComfyUI call a LoRA by its file name: <lora:file-name:0.8>.
        name = file.path.parent.name if file.path.stem == "pytorch_lora_weights" else file.path.stem
        if kohya_tensors(file) is not None and file_variant(keys) != "lora":
            return LycorisConcept(name, file.path, file.data)
        return LoRAConcept(name, file.path, file.data)


def kohya_tensors(file: TensorFile) -> dict[str, torch.Tensor] | None:
    if isinstance(file.data, dict) and any(str(k).startswith(KOHYA_STARTS) for k in file.data):
        return file.data
    return None


def write_kohya_lora(path: Path, backbone: Backbone, adapter: str, name: str, step: int) -> Path:
    """The kohya / LyCORIS / AUTOMATIC1111 / ComfyUI file of `adapter` (`kohya_lora`), written atomically."""
    return write_safetensors(path, *kohya_lora(backbone, adapter, name, step))


def kohya_lora(
    backbone: Backbone, adapter: str, name: str, step: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of `adapter` in the kohya / LyCORIS / AUTOMATIC1111 / ComfyUI layout: `lora_unet_<module>` (diffusers module names
    with '_') and each module's tensors under their names (`lycoris.layer_tensors`: `.lora_down.weight`
    [rank, in], `.lora_up.weight` [out, rank] (+ `.dora_scale` [out, 1]); `.hada_*`; `.lokr_*`) and `.alpha`
    (a scalar). A LoKr module without a rank-decomposed factor has no rank for the readers to divide
    alpha by: its scale goes into `lokr_w1` and it has no alpha."""
    tensors: dict[str, torch.Tensor] = {}
    rank = alpha = None
    variant = "lora"
    for part, module_name, layer in lora_layers(backbone, adapter):
        key = kohya_key(backbone, part, module_name)
        own = {suffix: tensor.detach() for suffix, tensor in layer_tensors(layer, adapter).items()}
        variant = file_variant(f".{suffix}" for suffix in own)
        rank = layer.r[adapter]
        alpha = float(layer.lora_alpha[adapter] if hasattr(layer, "lora_alpha") else layer.alpha[adapter])
        if has_rank(own):
            own["alpha"] = torch.tensor(alpha)
        else:
            own["lokr_w1"] = own["lokr_w1"] * layer.scaling[adapter]
        tensors.update({f"{key}.{suffix}": tensor for suffix, tensor in own.items()})
    lycoris = variant in ("loha", "lokr")
    metadata = {  # the keys kohya's (and LyCORIS') trainer writes that the webui shows
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora", "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha), "ss_output_name": name, "ss_steps": str(int(step)),
        "ss_sd_model_name": backbone.checkpoint_name, **model_spec(backbone, "lora", name),
    }  # fmt: skip
    if variant != "lora":
        metadata["ss_network_args"] = json.dumps({"algo": variant} if lycoris else {"dora_wd": "True"})
    return tensors, metadata


def model_spec(backbone: Backbone, adapter: str, title: str) -> dict[str, str]:
    """The ModelSpec keys (Stability AI's sai_model_spec, as kohya writes them) and kohya's base model
    version, which say what model family a file is for: the webui and ComfyUI's managers show them."""
    if backbone.is_xl:
        architecture, version = "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"
    elif backbone.context_dim == 1024:
        v = backbone.prediction_type == "v_prediction"
        architecture, version = ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"), "sd_v2"
    else:
        architecture, version = "stable-diffusion-v1", "sd_v1"
    size = backbone.native_resolution
    return {
        "ss_base_model_version": version,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{adapter}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if backbone.is_xl
        else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if backbone.prediction_type == "v_prediction" else "epsilon",
    }


def _interpolate(multiplier: float):
    """A forward hook giving base(x) + m x (layer(x) - base(x)): the layer's change at strength m."""

    def hook(layer: nn.Module, args, output):
        if multiplier == 1:
            return output
        base = layer.get_base_layer()(*args)
        return base if multiplier == 0 else base + multiplier * (output - base)

    return hook


def write_diffusers_lora(folder: Path, backbone: Backbone, adapter: str) -> Path:
    """diffusers' layout: folder/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(folder)`),
    written by diffusers' own save_lora_weights, with each part's rank and alpha in the metadata."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    parts: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for part, name, layer in lora_layers(backbone, adapter):
        state = parts.setdefault(part, {})  # peft's state-dict names, the adapter name left out
        state[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32)
        state[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32)
        dora = adapter in layer.lora_magnitude_vector
        if dora:
            magnitude = layer.lora_magnitude_vector[adapter].weight
            state[f"{name}.lora_magnitude_vector"] = magnitude.detach().to("cpu", torch.float32)
        targets = meta.setdefault(
            part, {"r": layer.r[adapter], "alpha": layer.lora_alpha[adapter], "t": set(), "dora": dora}
        )
        # the module's own name, as target_modules names it (to_q, to_out.0, q_proj)
        targets["t"].add(".".join(name.split(".")[-2:]) if name.endswith(".0") else name.rsplit(".", 1)[-1])

    def config(part: str) -> dict[str, Any] | None:
        if part not in meta:
            return None
        m = meta[part]
        return LoraConfig(
            r=m["r"], lora_alpha=m["alpha"], target_modules=sorted(m["t"]), use_dora=m["dora"]
        ).to_dict()

    def layers(part: str) -> dict[str, torch.Tensor] | None:
        return convert_state_dict_to_diffusers(parts[part]) if part in parts else None

    target = folder / "pytorch_lora_weights.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp, atomic_path(target) as out:
        pipeline = getattr(diffusers, PIPELINES[backbone.family]["text"])
        pipeline.save_lora_weights(tmp, **{
            f"{part}_lora_layers": layers(part) for part in ("unet", *backbone.text_parts)
        }, **{f"{part}_lora_adapter_metadata": config(part) for part in ("unet", *backbone.text_parts)})  # fmt: skip
        os.replace(Path(tmp) / target.name, out)
    return target


class LoRAConcept(Concept):
    """A LoRA file; `<lora:name:m>` applies it at strength m (several add up)."""

    method = LoRA

    def __init__(self, name: str, path: Path, tensors: dict[str, torch.Tensor], tensors_only: bool = False):
        """tensors_only: install these kohya tensors, not the file (a bundle's LoRA part)."""
        super().__init__(name, path)
        self.tensors, self.tensors_only = tensors, tensors_only
        self.adapter = name.replace(".", "_")  # peft keeps adapters in ModuleDicts: no dots
        self.backbone: Backbone | None = None

    def install(self, backbone: Backbone) -> None:
        try:
            if self.tensors_only:  # kohya tensors (their alpha included) without the rest of their file
                backbone.pipeline().load_lora_weights(dict(self.tensors), adapter_name=self.adapter)
            else:
                # From the file, not its tensors: diffusers' own files keep each part's alpha in their metadata
                # (kohya's in `.alpha` tensors); without it a LoRA would apply at multiplier x 1, not x alpha/rank.
                backbone.pipeline().load_lora_weights(
                    str(self.path.parent), weight_name=self.path.name, adapter_name=self.adapter
                )
        except (ValueError, RuntimeError, KeyError) as err:
            raise ConceptFileError(
                f"LoRA {self.name!r} ({self.path}) does not fit this model: {one_line(err)}"
            ) from err
        self.backbone = backbone
        layers = [layer for _, _, layer in lora_layers(backbone, self.adapter)]
        if not layers:
            raise ConceptFileError(
                f"LoRA {self.name!r} ({self.path}) matches no layer of this model: it was trained for another model"
            )
        for _, _, layer in lora_layers(
            backbone, None
        ):  # every loaded LoRA stays active; its scale switches it
            layer.set_adapter(sorted(layer.lora_A.keys()), inference_mode=True)
        self.deactivate()

    def _scale(self, multiplier: float) -> None:
        for _, _, layer in lora_layers(self.backbone, self.adapter):
            layer.set_scale(self.adapter, multiplier)

    def activate(self, multiplier: float) -> None:
        self._scale(multiplier)

    def deactivate(self) -> None:
        self._scale(0.0)


class LycorisConcept(Concept):
    """A LoHa, LoKr or DoRA file in the kohya / LyCORIS layout: each module's change computed from its
    tensors as the webui and ComfyUI compute it (`lycoris.weight_change`), added at `<lora:name:m>` x m."""

    method = LoRA

    def __init__(self, name: str, path: Path, tensors: dict[str, torch.Tensor]):
        super().__init__(name, path)
        self.tensors = tensors
        self.change: WeightChange | None = None

    def install(self, backbone: Backbone) -> None:
        modules = {
            kohya_key(backbone, part, name): module
            for part in ("unet", *backbone.text_parts)
            for name, module in getattr(backbone, part).named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d)
        }
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            module, _, suffix = key.partition(".")
            grouped.setdefault(module, {})[suffix] = tensor
        unknown = sorted(set(grouped) - set(modules))
        if len(unknown) == len(grouped):
            raise ConceptFileError(
                f"LoRA {self.name!r} ({self.path}) matches no layer of this model: it was trained for another model"
            )
        if unknown:
            raise ConceptFileError(
                f"LoRA {self.name!r} ({self.path}): {len(unknown)} of its modules are not in this model (e.g. "
                f"{unknown[0]}): it was trained for another model"
            )
        changes = {}
        for key, tensors in grouped.items():
            weight = modules[key].weight
            try:
                changes[key] = (modules[key], weight_change(tensors, weight).to(weight.device))
            except (RuntimeError, KeyError) as err:
                raise ConceptFileError(
                    f"LoRA {self.name!r} ({self.path}): {key} does not fit this model: {one_line(err)}"
                ) from err
        self.change = WeightChange(changes)

    def activate(self, multiplier: float) -> None:
        self.change.apply(multiplier)

    def deactivate(self) -> None:
        self.change.apply(0.0)
