"""LoRA (Hu et al. 2021) as diffusers trains it for Stable Diffusion: low-rank adapters on the UNet's
attention projections (and optionally the text encoder's), built with peft; only the adapters train.

Files: the kohya / AUTOMATIC1111 layout (`concepts/<concept>.safetensors`: `lora_unet_<module>` and
`lora_te_<module>` keys with `.lora_down.weight`, `.lora_up.weight` and `.alpha`), which drops into
the webui's or ComfyUI's `models/Lora/` and works as `<lora:<concept>:0.8>`; and diffusers' own
(`concepts/diffusers/pytorch_lora_weights.safetensors`, `pipe.load_lora_weights(folder)`).
At inference a LoRA is loaded with diffusers' loader and scaled with peft's, so `<lora:name:0>` is
exactly the bare model.
"""

from __future__ import annotations

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
from ..backbone import Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, one_line, read_tensor_file, write_safetensors
from .base import Concept, Method, MethodConfig, method_key

# peft and diffusers load inside the functions that use them, not here: importing them costs peft ~6 s, diffusers ~5 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

ADAPTER = "conceptlab"  # the adapter's name inside the backbone while training
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_key(part: str, module_name: str) -> str:
    """A module's name in kohya's layout: diffusers/transformers names with '_'. The text encoder's
    modules are named from CLIPTextModel's `text_model` down, as in SD's original text encoder
    (transformers 5 dropped that level from CLIPTextModel's own names)."""
    if part == "text_encoder" and not module_name.startswith("text_model."):
        module_name = f"text_model.{module_name}"
    return KOHYA_PREFIXES[part] + module_name.replace(".", "_")


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA: low-rank adapters on the attention projections; only the adapters train."""

    _target_: str = "conceptlab.methods.lora.LoRA"
    name: str = method_key("name", "lora")
    rank: int = opt(4, "the adapters' rank", valid="[1, inf)")
    alpha: float | None = opt(
        None, "scale numerator: the update is (alpha / rank) B A; null = rank (scale 1)", valid="(0, inf)"
    )
    target_modules: list[str] = opt(
        ["to_k", "to_q", "to_v", "to_out.0"], "UNet modules that get adapters", nonempty=True
    )
    dropout: float = opt(0.0, "dropout on the adapters' input while training", valid="[0, 1)")
    text_encoder: bool = opt(False, "also adapt the text encoder's attention (q_proj k_proj v_proj out_proj)")
    init_from: str | None = method_key(
        "init_from", None, "continue from a LoRA file (kohya/A1111 or diffusers .safetensors)"
    )
    lr: Any = method_key("lr", 1.0e-4, 'learning rate, or a schedule "1e-4:1000, 5e-5"')


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_layers(backbone: Backbone, adapter: str | None) -> Iterator[tuple[str, str, nn.Module]]:
    """(part, module name, layer) for every peft LoRA layer of the UNet and text encoder that holds
    `adapter` (None: every LoRA layer)."""
    from peft.tuners.lora import LoraLayer

    for part in ("unet", "text_encoder"):
        for name, module in getattr(backbone, part).named_modules():
            if isinstance(module, LoraLayer) and (adapter is None or adapter in module.lora_A):
                yield part, name, module


class LoRA(Method):
    """Train low-rank adapters of the UNet's (and optionally the text encoder's) attention projections."""

    Config = LoRAConfig
    prompt_tag = "lora"
    file_formats = "kohya/AUTOMATIC1111 LoRA (.safetensors, lora_unet_ keys), diffusers LoRA (.safetensors)"

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str, rank: int = 4,
                 alpha: float | None = None, target_modules: list[str] | None = None, dropout: float = 0.0,
                 text_encoder: bool = False, init_from: str | None = None):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        if rank < 1:
            raise ConfigError(f"method.rank={rank}: a LoRA needs rank 1 or more")
        if not 0 <= dropout < 1:
            raise ConfigError(f"method.dropout={dropout}: a probability in [0, 1)")
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
        from peft import LoraConfig, inject_adapter_in_model

        def config(targets: list[str]) -> LoraConfig:
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              init_lora_weights="gaussian", target_modules=targets)  # fmt: skip

        try:
            backbone.unet.add_adapter(config(self.target_modules), adapter_name=ADAPTER)  # diffusers' way
            if self.text_encoder:  # peft's own injection (transformers' add_adapter wants a newer peft)
                inject_adapter_in_model(
                    config(TEXT_ENCODER_TARGETS), backbone.text_encoder, adapter_name=ADAPTER
                )
        except ValueError as err:  # peft: a target module that does not exist
            raise ConfigError(f"method.target_modules={self.target_modules}: {err}") from err
        object.__setattr__(self, "_backbone", backbone)
        if self.init_from:
            self._load_initial(backbone)
        for _, _, layer in lora_layers(backbone, ADAPTER):
            layer.lora_A[ADAPTER].requires_grad_(True)
            layer.lora_B[ADAPTER].requires_grad_(True)
        self.train(self.training)

    def packed_modules(self, backbone: Backbone) -> list[str]:
        return [f"{part}.{name}" for part, name, _ in lora_layers(backbone, ADAPTER)]

    def _load_initial(self, backbone: Backbone) -> None:
        """Copy a LoRA file's adapters into ours (same rank; every one of our modules must be in it)."""
        file = read_tensor_file(self.init_from)
        weights = kohya_tensors(file)
        if weights is None:
            raise ConceptFileError(f"{self.init_from} is not a kohya/A1111 LoRA file (lora_unet_ keys)")
        for part, name, layer in lora_layers(backbone, ADAPTER):
            key = kohya_key(part, name)
            if f"{key}.lora_down.weight" not in weights:
                raise ConceptFileError(f"{self.init_from} has no adapter for {part} module {name}")
            down, up = weights[f"{key}.lora_down.weight"], weights[f"{key}.lora_up.weight"]
            if down.shape != layer.lora_A[ADAPTER].weight.shape:
                raise ConceptFileError(
                    f"{self.init_from}: {key} has rank {down.shape[0]} and width {down.shape[1]}, but this run "
                    f"needs rank {self.rank} and width {layer.lora_A[ADAPTER].weight.shape[1]}; set method.rank={down.shape[0]}"
                )
            with torch.no_grad():
                layer.lora_A[ADAPTER].weight.copy_(down)
                layer.lora_B[ADAPTER].weight.copy_(up)

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
                layer.lora_dropout[ADAPTER].train(mode)
        return self

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        layers = [layer for _, _, layer in lora_layers(self._backbone, ADAPTER)]
        for layer in layers:
            layer.set_scale(ADAPTER, multiplier)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_scale(ADAPTER, 1.0)

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        return [
            write_kohya_lora(folder / f"{self.concept}.safetensors", backbone, ADAPTER, self.concept, step),
            write_diffusers_lora(folder / "diffusers", backbone, ADAPTER),
        ]

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> LoRAConcept | None:
        if not file.is_safetensors or not isinstance(file.data, dict):
            return None
        keys = list(file.data)
        is_lora = any(k.startswith(tuple(KOHYA_PREFIXES.values())) for k in keys) or any(
            ".lora_A." in k or ".lora.down." in k or ".lora_down." in k for k in keys
        )
        if not is_lora:
            return None
        # A1111 and ComfyUI call a LoRA by its file name: <lora:file-name:0.8>.
        name = file.path.parent.name if file.path.stem == "pytorch_lora_weights" else file.path.stem
        return LoRAConcept(name, file.path, file.data)


def kohya_tensors(file: TensorFile) -> dict[str, torch.Tensor] | None:
    if isinstance(file.data, dict) and any(
        str(k).startswith(tuple(KOHYA_PREFIXES.values())) for k in file.data
    ):
        return file.data
    return None


def write_kohya_lora(path: Path, backbone: Backbone, adapter: str, name: str, step: int) -> Path:
    """The kohya / AUTOMATIC1111 / ComfyUI layout: `lora_unet_<module>` (diffusers module names with
    '_'), `.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank], `.alpha` (a scalar)."""
    tensors: dict[str, torch.Tensor] = {}
    rank = alpha = None
    for part, module_name, layer in lora_layers(backbone, adapter):
        key = kohya_key(part, module_name)
        tensors[f"{key}.lora_down.weight"] = layer.lora_A[adapter].weight
        tensors[f"{key}.lora_up.weight"] = layer.lora_B[adapter].weight
        rank, alpha = layer.r[adapter], float(layer.lora_alpha[adapter])
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    metadata = {  # the keys kohya's trainer writes that the webui shows
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_output_name": name, "ss_steps": str(int(step)), "ss_sd_model_name": backbone.checkpoint_name,
    }  # fmt: skip
    return write_safetensors(path, tensors, metadata)


def write_diffusers_lora(folder: Path, backbone: Backbone, adapter: str) -> Path:
    """diffusers' layout: folder/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(folder)`),
    written by diffusers' own save_lora_weights, with each part's rank and alpha in the metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    parts: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for part, name, layer in lora_layers(backbone, adapter):
        state = parts.setdefault(part, {})  # peft's state-dict names, the adapter name left out
        state[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32)
        state[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32)
        targets = meta.setdefault(
            part, {"r": layer.r[adapter], "alpha": layer.lora_alpha[adapter], "t": set()}
        )
        # the module's own name, as target_modules names it (to_q, to_out.0, q_proj)
        targets["t"].add(".".join(name.split(".")[-2:]) if name.endswith(".0") else name.rsplit(".", 1)[-1])

    def config(part: str) -> dict[str, Any] | None:
        if part not in meta:
            return None
        m = meta[part]
        return LoraConfig(r=m["r"], lora_alpha=m["alpha"], target_modules=sorted(m["t"])).to_dict()

    def layers(part: str) -> dict[str, torch.Tensor] | None:
        return convert_state_dict_to_diffusers(parts[part]) if part in parts else None

    target = folder / "pytorch_lora_weights.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp, atomic_path(target) as out:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers("unet"), text_encoder_lora_layers=layers("text_encoder"),
            unet_lora_adapter_metadata=config("unet"), text_encoder_lora_adapter_metadata=config("text_encoder"),
        )  # fmt: skip
        os.replace(Path(tmp) / target.name, out)
    return target


class LoRAConcept(Concept):
    """A LoRA file; `<lora:name:m>` applies it at strength m (several add up)."""

    method = LoRA

    def __init__(self, name: str, path: Path, tensors: dict[str, torch.Tensor]):
        super().__init__(name, path)
        self.tensors = tensors
        self.adapter = name.replace(".", "_")  # peft keeps adapters in ModuleDicts: no dots
        self.backbone: Backbone | None = None

    def install(self, backbone: Backbone) -> None:
        try:
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
