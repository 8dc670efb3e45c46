"""Custom Diffusion (Kumari et al. 2023) as the diffusers example trains it: the key and value projections
of the UNet's cross-attention (with `train_q_out`, its query and output projections too) fine-tuned
together with a new modifier word ("<new1>"), on the concept's images captioned "a photo of <new1> dog",
with prior preservation from class images drawn once and cached (as DreamBooth's). `method.joint` trains
more concepts in the same run, as the paper's multi-concept fine-tuning and the example's
`--concepts_list` do: each its images, its own word ("<new2>") and class, the projections shared.

Files (`concepts/`):
* `<concept>.safetensors`: the fine-tuned projections under diffusers' module names and each word's vectors
  (metadata `format: conceptlab-custom-diffusion`): what `generate.py` reads. The words are the words;
  `<custom_diffusion:<concept>:m>` applies base + m x (fine-tuned - base) to the projections, so 0 is
  the bare model (with the word).
* `diffusers/pytorch_custom_diffusion_weights.safetensors` and `diffusers/<word>.safetensors`: diffusers'
  Custom Diffusion layout (a processor entry for every attention layer, empty where nothing trains) and
  a textual-inversion file per word.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from ..backbone import Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, write_safetensors
from .base import Concept, JointSet, Method, MethodConfig, PriorSpec, method_key
from .dreambooth import DreamBoothConfig, class_prior, mixed, weights_at
from .textual_inversion import (
    Embedding,
    EmbeddingConcept,
    TextualInversion,
    TextualInversionConfig,
    write_diffusers_embedding,
)

FORMAT = "conceptlab-custom-diffusion"
WORD = "word."  # the key prefix of a word's vectors in conceptlab's file
WORD_G = "word_g."  # ... and of an SDXL word's second half (the second text encoder's, clip_g)
DIFFUSERS_FILE = "pytorch_custom_diffusion_weights.safetensors"


@dataclass
class CustomDiffusionConfig(MethodConfig):
    """Custom Diffusion: the cross-attention's key/value projections and a modifier word, with prior
    preservation."""

    _target_: str = "conceptlab.methods.custom_diffusion.CustomDiffusion"
    name: str = method_key("name", "custom_diffusion")
    placeholder: str | None = method_key(
        "placeholder",
        "<new1>",
        "the modifier word (the diffusers example's <new1>)",
        of=TextualInversionConfig,
    )
    initializer_token: str = method_key(
        "initializer_token", "sks", "a rare existing token its vectors start from (one CLIP token: sks)",
        of=TextualInversionConfig,
    )  # fmt: skip
    train_q_out: bool = opt(False, "also fine-tune the cross-attention's query and output projections")
    class_word: str | None = method_key("class_word", None, of=DreamBoothConfig)
    num_class_images: int = method_key("num_class_images", 100, of=DreamBoothConfig)
    prior_loss_weight: float = method_key("prior_loss_weight", 1.0, of=DreamBoothConfig)
    class_prompt: str | None = method_key("class_prompt", None, of=DreamBoothConfig)
    class_steps: int = method_key("class_steps", 50, of=DreamBoothConfig)
    class_guidance: float = method_key("class_guidance", 7.5, of=DreamBoothConfig)
    lr: Any = method_key("lr", 1.0e-5, "learning rate of the projections and the word (the example's 1e-5)")
    joint: list[Any] = opt(
        [],
        "more concepts trained jointly: [{path: <images>, placeholder: <new2>, class_word: <noun>}, ...] "
        "(class_word: the run's if left out; class_prompt optional)",
    )


class CustomDiffusion(Method):
    """Fine-tune the cross-attention's key/value projections and a modifier word, with prior preservation."""

    Config = CustomDiffusionConfig
    prompt_tag = "custom_diffusion"
    file_formats = "a Custom Diffusion file (.safetensors, metadata format conceptlab-custom-diffusion)"

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str, init_from: str | None = None,
                 placeholder: str | None = "<new1>", initializer_token: str = "sks", train_q_out: bool = False,
                 class_word: str | None = None, num_class_images: int = 100, prior_loss_weight: float = 1.0,
                 class_prompt: str | None = None, class_steps: int = 50, class_guidance: float = 7.5,
                 joint: list[Any] | None = None):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)

        def prior(word: str | None, prompt: str | None) -> PriorSpec | None:
            return class_prior("custom_diffusion", "Custom Diffusion", init_from, word, prompt, num_class_images,
                               prior_loss_weight, class_steps, class_guidance)  # fmt: skip

        def new_word(placeholder: str | None) -> TextualInversion:
            return TextualInversion(name="ti", lr=lr, scale_lr=False, concept=concept, placeholder=placeholder,
                                    initializer_token=initializer_token)  # fmt: skip

        self.spec = prior(class_word, class_prompt)
        self.word = new_word(placeholder)
        self.class_word, self.train_q_out = class_word, train_q_out
        # method.joint: each other concept's images, word (a module: its vectors train) and class images
        self.joint_words = nn.ModuleList()
        self._joint: list[JointSet] = []
        for k, entry in enumerate(joint or []):
            entry = dict(entry)
            unknown = set(entry) - {"path", "placeholder", "class_word", "class_prompt"}
            if not entry.get("path") or not entry.get("placeholder") or unknown:
                raise ConfigError(
                    f"method.joint[{k}]: give path and placeholder (and optionally class_word, class_prompt), "
                    f"e.g. {{path: bundled:toy_gem, placeholder: '<new2>', class_word: shape}}"
                    + (f"; unknown keys {sorted(unknown)}" if unknown else "")
                )
            words = [self.word.placeholder, *(w.placeholder for w in self.joint_words)]
            if entry["placeholder"] in words:
                raise ConfigError(
                    f"method.joint[{k}].placeholder={entry['placeholder']}: already the word of another concept of "
                    "this run; give each concept its own (<new2>, <new3>, ...)"
                )
            self.joint_words.append(new_word(entry["placeholder"]))
            noun = entry.get("class_word") or class_word
            self._joint.append(
                JointSet(str(entry["path"]), f"{entry['placeholder']} {noun}", prior(noun, entry.get("class_prompt")))
            )  # fmt: skip
        self._backbone: Backbone | None = None  # not a submodule: the projections are the backbone's
        self._base: dict[str, torch.Tensor] = {}

    @property
    def prompt_text(self) -> str:
        return f"{self.word.prompt_text} {self.class_word}"

    @property
    def prompt_words(self) -> str:
        return self.word.prompt_text  # the class word follows it in every evaluation prompt

    @property
    def prior(self) -> PriorSpec | None:
        return self.spec

    @property
    def joint_sets(self) -> list[JointSet]:
        return self._joint

    @property
    def words(self) -> list[TextualInversion]:
        """Every word this run trains: the concept's, then method.joint's."""
        return [self.word, *self.joint_words]

    def trained_names(self, backbone: Backbone) -> list[str]:
        """The UNet's parameters this method trains: each cross-attention's to_k and to_v weights (and with
        train_q_out to_q's and to_out.0's weight and bias)."""
        parts = ("to_k.weight", "to_v.weight")
        if self.train_q_out:
            parts += ("to_q.weight", "to_out.0.weight", "to_out.0.bias")
        return [n for n, _ in backbone.unet.named_parameters() if ".attn2." in n and n.endswith(parts)]

    def attach(self, backbone: Backbone) -> None:
        for word in self.words:
            word.attach(backbone)
        object.__setattr__(self, "_backbone", backbone)
        params = dict(backbone.unet.named_parameters())
        self._base = {n: params[n].detach().clone() for n in self.trained_names(backbone)}
        for name in self._base:
            params[name].requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = dict(self._backbone.unet.named_parameters())
        return [*(p for word in self.words for p in word.vector_parts), *(params[n] for n in self._base)]

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        with weights_at(self._backbone.unet, self._base, multiplier):
            yield

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        params = dict(backbone.unet.named_parameters())
        weights = {n: params[n].detach() for n in self._base}
        vectors = {word.placeholder: word.vectors.detach() for word in self.words}
        # SDXL: each word's second encoder's half; diffusers loads it as a second file (text_encoder_2)
        halves = {
            word.placeholder: word.vectors_2.detach() for word in self.words if word.vectors_2 is not None
        }
        meta = {"format": FORMAT, "word": self.word.placeholder, "class_word": self.class_word,
                "base": str(backbone.checkpoint_name), "step": str(int(step))}  # fmt: skip
        tensors = {**weights, **{f"{WORD}{w}": v for w, v in vectors.items()},
                   **{f"{WORD_G}{w}": v for w, v in halves.items()}}  # fmt: skip
        diffusers = folder / "diffusers"
        files = [
            write_safetensors(folder / f"{self.concept}.safetensors", tensors, meta),
            write_diffusers_custom_diffusion(diffusers / DIFFUSERS_FILE, backbone, weights),
        ]
        for w, v in vectors.items():
            files.append(write_diffusers_embedding(diffusers / f"{w}.safetensors", w, v))
            if w in halves:
                files.append(write_diffusers_embedding(diffusers / f"{w}_2.safetensors", w, halves[w]))
        return files

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> CustomDiffusionConcept | None:
        if not file.is_safetensors or file.metadata.get("format") != FORMAT:
            return None
        return CustomDiffusionConcept(file.path.stem, file.path, file.data, file.metadata)


def write_diffusers_custom_diffusion(
    path: Path, backbone: Backbone, weights: dict[str, torch.Tensor]
) -> Path:
    """diffusers' Custom Diffusion file (`unet.load_attn_procs`): for every attention processor of the
    UNet, `<processor>.to_k_custom_diffusion.weight` and `.to_v_custom_diffusion.weight` (`to_q_…`,
    `to_out_custom_diffusion.0.…` with train_q_out) where it trained, an empty tensor under its name where
    it did not (the loader gives those processors nothing to train)."""
    renamed = {"to_k.weight": "to_k_custom_diffusion.weight", "to_v.weight": "to_v_custom_diffusion.weight",
               "to_q.weight": "to_q_custom_diffusion.weight", "to_out.0.weight": "to_out_custom_diffusion.0.weight",
               "to_out.0.bias": "to_out_custom_diffusion.0.bias"}  # fmt: skip
    state = {}
    for processor in backbone.unet.attn_processors:  # "down_blocks.0.attentions.0.…attn1.processor"
        module = processor.removesuffix(".processor")
        own = {f"{processor}.{new}": weights[f"{module}.{old}"] for old, new in renamed.items()
               if f"{module}.{old}" in weights}  # fmt: skip
        state.update(own or {processor: torch.zeros(0)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(tmp))
    return path


class CustomDiffusionConcept(Concept):
    """A Custom Diffusion file: its word joins the tokenizer; `<custom_diffusion:name:m>` applies the
    projections' change at strength m (0: the bare model's projections)."""

    method = CustomDiffusion

    def __init__(self, name: str, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(name, path)
        self.metadata = metadata
        word = metadata.get("word", "")
        if f"{WORD}{word}" not in tensors:
            raise ConceptFileError(
                f"{path}: a Custom Diffusion file without its word's vectors ({WORD}{word})"
            )

        # its word first, then those of concepts trained with it
        def embedding(name: str, vectors: torch.Tensor) -> EmbeddingConcept:
            half = tensors.get(f"{WORD_G}{name}")  # SDXL's second half
            return EmbeddingConcept(Embedding(name=name, vectors=vectors.float(),
                                              sdxl_clip_g=None if half is None else half.float()), Path(path))  # fmt: skip

        self.embeddings = [embedding(k.removeprefix(WORD), v)
                           for k, v in sorted(tensors.items(), key=lambda kv: kv[0] != f"{WORD}{word}")
                           if k.startswith(WORD)]  # fmt: skip
        self.word = self.embeddings[0]
        self.weights = {k: v for k, v in tensors.items() if not k.startswith((WORD, WORD_G))}
        self.backbone: Backbone | None = None
        self.base: dict[str, torch.Tensor] = {}

    @property
    def words(self) -> str:
        return self.word.token

    def install(self, backbone: Backbone) -> None:
        own = dict(backbone.unet.named_parameters())
        wrong = [k for k, v in self.weights.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise ConceptFileError(
                f"Custom Diffusion file {self.name!r} ({self.path}): {len(wrong)} of its projections do not fit this "
                f"model's UNet (e.g. {wrong[0]}): it was trained for another model"
            )
        for embedding in self.embeddings:
            embedding.install(backbone)
        self.backbone = backbone
        self.base = {k: own[k].detach().clone() for k in self.weights}
        self.weights = {k: v.to(own[k]) for k, v in self.weights.items()}
        self.deactivate()

    def activate(self, multiplier: float) -> None:
        with torch.no_grad():
            self.backbone.unet.load_state_dict(mixed(self.base, self.weights, multiplier), strict=False)

    def deactivate(self) -> None:
        self.activate(0.0)

    def rewrite_prompt(self, text: str) -> str:
        for embedding in self.embeddings:
            text = embedding.rewrite_prompt(text)
        return text

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "word": self.word.token, "class_word": self.metadata.get("class_word"),
                "joint_words": [e.token for e in self.embeddings[1:]]}  # fmt: skip
