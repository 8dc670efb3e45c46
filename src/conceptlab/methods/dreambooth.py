"""DreamBooth (Ruiz et al. 2023) as the diffusers example trains it: the whole UNet fine-tuned on the
concept's images captioned with a rare identifier and the class word ("a photo of sks dog"), with prior
preservation: class images ("a photo of a dog") drawn once by the frozen backbone, kept in the evaluation
cache for every run and sweep, and trained beside the concept's, their loss weighted by
`prior_loss_weight`.

With `method.train_text_encoder=true` the text encoder (SDXL: both) trains too, at the same rate, as
the diffusers example's `--train_text_encoder` does.

Files (`concepts/`): `<concept>.safetensors`, the fine-tuned UNet's weights under diffusers' names (and a
trained text encoder's under `text_encoder.` / `text_encoder_2.`; what `generate.py` reads:
`<dreambooth:<concept>:m>` applies base + m x (fine-tuned - base), so 0 is the bare model), and
`diffusers/unet/` (and `diffusers/text_encoder/`, `diffusers/text_encoder_2/`), each part as diffusers
saves it (`UNet2DConditionModel.from_pretrained`, `CLIPTextModel.from_pretrained`, or a pipeline's
`unet=` / `text_encoder=`). With `method.checkpoint_file=true` on SD 1.x or SDXL, also
`checkpoint/<concept>.safetensors`: the whole model (the fine-tuned UNet, the VAE and the text encoders,
trained or not) as one original-layout file in float16, what the webui's `models/Stable-diffusion/`,
ComfyUI's checkpoint loader and diffusers' `from_single_file` take.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import TEXT_PARTS, Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, write_safetensors
from ..layouts import original_checkpoint
from .base import Concept, Method, MethodConfig, PriorSpec, method_key

FORMAT = "conceptlab-dreambooth"  # the metadata's `format` of a DreamBooth UNet file


@dataclass
class DreamBoothConfig(MethodConfig):
    """DreamBooth: the UNet fine-tuned on the concept with a rare identifier and its class word, with prior
    preservation."""

    _target_: str = "conceptlab.methods.dreambooth.DreamBooth"
    name: str = method_key("name", "dreambooth")
    identifier: str = opt("sks", "the rare word that names the subject in captions ('a photo of sks dog')")
    class_word: str | None = opt(
        None, "the subject's class noun (dog, backpack); its yaml takes data.class_word; required"
    )
    num_class_images: int = opt(
        100,
        "class images for prior preservation, drawn once and cached; 0 = no prior preservation",
        valid="[0, inf)",
    )
    prior_loss_weight: float = opt(1.0, "the class images' loss weight", valid="[0, inf)")
    class_prompt: str | None = opt(None, "the class images' prompt; null = 'a photo of a <class word>'")
    class_steps: int = opt(50, "DDIM steps of the class images", valid="[1, inf)")
    class_guidance: float = opt(7.5, "classifier-free guidance of the class images", valid="[0, inf)")
    lr: Any = method_key("lr", 5.0e-6, "learning rate of the UNet (the diffusers example's 5e-6)")
    train_text_encoder: bool = opt(
        False,
        "fine-tune the text encoder (SDXL: both) too, at method.lr (the example's --train_text_encoder)",
    )
    checkpoint_file: bool = opt(
        False,
        "SD 1.x, SDXL: also write the whole model as one original-layout float16 .safetensors (concepts/checkpoint/; "
        "the webui's models/Stable-diffusion/, ComfyUI's checkpoints/), ~2 GB for SD 1.5, ~7 GB for SDXL at every export",
    )


class DreamBooth(Method):
    """Fine-tune the whole UNet on the concept, with prior preservation."""

    Config = DreamBoothConfig
    prompt_tag = "dreambooth"
    file_formats = "a DreamBooth UNet (.safetensors, metadata format conceptlab-dreambooth)"

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str, init_from: str | None = None,
                 identifier: str = "sks", class_word: str | None = None, num_class_images: int = 100,
                 prior_loss_weight: float = 1.0, class_prompt: str | None = None, class_steps: int = 50,
                 class_guidance: float = 7.5, train_text_encoder: bool = False,
                 checkpoint_file: bool = False):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        self.checkpoint_file, self.train_text_encoder = checkpoint_file, train_text_encoder
        self.identifier, self.class_word = identifier, class_word
        self.spec = class_prior("dreambooth", "DreamBooth", init_from, class_word, class_prompt, num_class_images,
                                prior_loss_weight, class_steps, class_guidance)  # fmt: skip
        self._backbone: Backbone | None = None  # not a submodule: the UNet is the backbone's
        self._base: dict[str, dict[str, torch.Tensor]] = {}  # the bare weights of each part that trains

    @property
    def prompt_text(self) -> str:
        return f"{self.identifier} {self.class_word}"

    @property
    def prompt_words(self) -> str:
        return self.identifier  # the class word follows it in every evaluation prompt

    @property
    def changes_text_encoding(self) -> bool:
        return self.train_text_encoder  # if frozen, captions' contexts are computed once

    @property
    def prior(self) -> PriorSpec | None:
        return self.spec

    def attach(self, backbone: Backbone) -> None:
        if self.checkpoint_file and not backbone.is_xl and backbone.context_dim == 1024:  # SD 2's OpenCLIP
            raise ConfigError(
                "method.checkpoint_file=true writes SD 1.x and SDXL checkpoints; this model is SD 2.x-shaped: "
                "use the diffusers UNet folder (method.checkpoint_file=false)"
            )
        object.__setattr__(self, "_backbone", backbone)
        # The bare weights, for the multipliers (<dreambooth:name:0> is the bare model) and the files.
        for part in self.parts(backbone):
            module = getattr(backbone, part)
            self._base[part] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.requires_grad_(True)

    def parts(self, backbone: Backbone) -> list[str]:
        """The backbone's parts this run fine-tunes: the UNet, and the text encoders with train_text_encoder."""
        return ["unet", *(backbone.text_parts if self.train_text_encoder else [])]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for part in self._base for p in getattr(self._backbone, part).parameters() if p.requires_grad
        ]

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        with ExitStack() as stack:
            for part, base in self._base.items():
                stack.enter_context(weights_at(getattr(self._backbone, part), base, multiplier))
            yield

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        weights = {
            (k if part == "unet" else f"{part}.{k}"): v.detach().to("cpu").contiguous()
            for part in self._base
            for k, v in getattr(backbone, part).state_dict().items()
        }
        meta = {"format": FORMAT, "identifier": self.identifier, "class_word": self.class_word,
                "base": str(backbone.checkpoint_name), "step": str(int(step))}  # fmt: skip
        path = write_safetensors(folder / f"{self.concept}.safetensors", weights, meta)
        files = [path]
        for part in self._base:  # diffusers' folder of each part that trained
            part_folder = folder / "diffusers" / part
            part_folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=part_folder) as tmp:  # each file renamed into place whole
                getattr(backbone, part).save_pretrained(tmp)
                for file in sorted(Path(tmp).iterdir()):
                    os.replace(file, part_folder / file.name)
            files.append(next(part_folder.glob("*.safetensors")))
        if self.checkpoint_file:
            encoders = [getattr(backbone, part) for part in backbone.text_parts]
            state = original_checkpoint(backbone.unet, backbone.vae, *encoders)
            about = {k: v for k, v in meta.items() if k != "format"}  # a model, not a concept file
            files.append(
                write_safetensors(
                    folder / "checkpoint" / f"{self.concept}.safetensors", state, about, torch.float16
                )
            )
        return files

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> DreamBoothConcept | None:
        if not file.is_safetensors or file.metadata.get("format") != FORMAT:
            return None
        return DreamBoothConcept(file.path.stem, file.path, file.data, file.metadata)


def class_prior(method: str, label: str, init_from: str | None, class_word: str | None, class_prompt: str | None,
                count: int, weight: float, steps: int, guidance: float) -> PriorSpec | None:  # fmt: skip
    """The prior preservation of a method that fine-tunes the backbone's own weights on "<word> <class>"
    captions (DreamBooth, Custom Diffusion): refused without a class word or with init_from; None for
    no class images."""
    if not class_word:
        raise ConfigError(
            f"method={method} needs the subject's class noun for its captions and class images: set "
            "data.class_word=dog (or method.class_word=dog)"
        )
    if init_from:
        raise ConfigError(
            f"method.init_from: {label} starts from the backbone itself; use resume=true to go on"
        )
    if count <= 0:
        return None
    return PriorSpec(class_prompt or f"a photo of a {class_word}", count, weight, steps, guidance)


@contextmanager
def weights_at(unet: nn.Module, base: dict[str, torch.Tensor], multiplier: float) -> Iterator[None]:
    """The UNet's tensors named in `base` at base + m x (trained - base) for the duration, then trained
    again (a method that fine-tunes the backbone's own weights: DreamBooth, Custom Diffusion)."""
    if multiplier == 1:
        yield
        return
    state = unet.state_dict()
    trained = {k: state[k].detach().clone() for k in base}
    with torch.no_grad():
        unet.load_state_dict(mixed(base, trained, multiplier), strict=False)
    try:
        yield
    finally:
        with torch.no_grad():
            unet.load_state_dict(trained, strict=False)


def mixed(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], multiplier: float
) -> dict[str, torch.Tensor]:
    """base + m x (tuned - base) for every tensor; exactly base at 0 and tuned at 1."""
    if multiplier == 0:
        return base
    if multiplier == 1:
        return tuned
    return {k: base[k] + multiplier * (tuned[k].to(base[k]) - base[k]) for k in base}


class DreamBoothConcept(Concept):
    """A DreamBooth UNet: `<dreambooth:name:m>` swaps the backbone's UNet weights for base + m x (tuned - base)."""

    method = DreamBooth

    def __init__(self, name: str, path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(name, path)
        self.metadata = metadata
        # {part: its tensors}: the UNet's keys are bare, a text encoder's carry its part's name
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights.items():
            part, _, rest = key.partition(".")
            part, rest = (part, rest) if part in TEXT_PARTS else ("unet", key)
            self.weights.setdefault(part, {})[rest] = value
        self.backbone: Backbone | None = None
        self.base: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def words(self) -> str:
        return self.metadata.get("identifier", "sks")  # the class word follows it in evaluation prompts

    def install(self, backbone: Backbone) -> None:
        missing = [part for part in self.weights if part not in ("unet", *backbone.text_parts)]
        if missing:
            raise ConceptFileError(
                f"DreamBooth file {self.name!r} ({self.path}) holds a {missing[0]} this model does not have: "
                "it was trained for another model"
            )
        for part, weights in self.weights.items():
            own = getattr(backbone, part).state_dict()
            wrong = [k for k in own if k not in weights or weights[k].shape != own[k].shape]
            if wrong or len(weights) != len(own):
                raise ConceptFileError(
                    f"DreamBooth file {self.name!r} ({self.path}) does not fit this model's {part} ({len(wrong)} tensors "
                    f"differ, e.g. {wrong[0] if wrong else next(k for k in weights if k not in own)}): it was trained for another model"
                )
            self.base[part] = {k: v.detach().clone() for k, v in own.items()}
            self.weights[part] = {k: v.to(own[k]) for k, v in weights.items()}
        self.backbone = backbone

    def activate(self, multiplier: float) -> None:
        with torch.no_grad():
            for part, weights in self.weights.items():
                getattr(self.backbone, part).load_state_dict(mixed(self.base[part], weights, multiplier))

    def deactivate(self) -> None:
        self.activate(0.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "words": self.words, "base": self.metadata.get("base")}
