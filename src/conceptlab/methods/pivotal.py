"""Pivotal tuning: a textual-inversion embedding and a LoRA trained together, as the diffusers advanced
training scripts do (the embedding "pivots" the concept into the text space, the LoRA adapts the UNet to
it). The embedding has its own learning rate and may stop training after `embedding_steps`.

Files (`concepts/`):
* `<concept>.safetensors`: the kohya LoRA with the embedding bundled (`bundle_emb.<word>.string_to_param.*`),
  which the webui's built-in LoRA extension reads as one network: `<lora:<concept>:1>` plus the word;
* `embedding/<concept>.safetensors|.pt` and `lora/<concept>.safetensors` (+ `lora/diffusers/`): the pair
  for tools that do not read bundles (ComfyUI, diffusers: `load_textual_inversion` + `load_lora_weights`).

generate.py reads the bundle: the word and `<lora:<concept>:m>` (m scales the LoRA; the word stays).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, read_tensor_file, write_safetensors
from .base import Concept, Method, MethodConfig, method_key
from .lora import ADAPTER, BUNDLE_PREFIX, KOHYA_STARTS, LoRA, LoRAConcept, LoRAConfig, kohya_lora
from .textual_inversion import Embedding, EmbeddingConcept, TextualInversion, TextualInversionConfig


@dataclass
class PivotalConfig(MethodConfig):
    """Pivotal tuning: a new word's embedding and a LoRA trained together."""

    _target_: str = "conceptlab.methods.pivotal.PivotalTuning"
    name: str = method_key("name", "pivotal")
    # textual inversion's keys and LoRA's, as they declare them
    placeholder: str | None = method_key("placeholder", None, of=TextualInversionConfig)
    num_vectors: int = method_key(
        "num_vectors",
        2,
        "the word's vectors (the diffusers advanced scripts' default: 2)",
        of=TextualInversionConfig,
    )
    initializer_token: str = method_key("initializer_token", "object", of=TextualInversionConfig)
    rank: int = method_key("rank", 4, of=LoRAConfig)
    alpha: float | None = method_key("alpha", None, of=LoRAConfig)
    target_modules: list[str] = method_key("target_modules", LoRAConfig().target_modules, of=LoRAConfig)
    text_encoder: bool = method_key("text_encoder", False, of=LoRAConfig)
    embedding_lr: float = opt(
        5.0e-4, "the embedding's learning rate (scale_lr scales it as it scales lr)", valid="(0, inf)"
    )
    embedding_steps: int | None = opt(
        None,
        "train the embedding for the first N steps only, then the LoRA alone (the diffusers advanced scripts' "
        "--train_text_encoder_ti_frac as steps); null = the whole run",
        valid="[0, inf)",
    )
    init_from: str | None = method_key(
        "init_from", None, "continue from a pivotal file (the LoRA with its bundled embedding)"
    )
    lr: Any = method_key("lr", 1.0e-4, 'the LoRA\'s learning rate, or a schedule "1e-4:1000, 5e-5"')


class PivotalTuning(Method):
    """A textual-inversion embedding and a LoRA, trained together in one run."""

    Config = PivotalConfig
    prompt_tag = LoRA.prompt_tag  # the LoRA part is applied with <lora:name:m>, the word is written
    file_formats = (
        "a kohya LoRA with its embedding bundled (bundle_emb.<word>.string_to_param.*: the webui's)"
    )

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str, init_from: str | None = None,
                 placeholder: str | None = None, num_vectors: int = 2, initializer_token: str = "object",
                 rank: int = 4, alpha: float | None = None, target_modules: list[str] | None = None,
                 text_encoder: bool = False, embedding_lr: float = 5.0e-4, embedding_steps: int | None = None):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        self.embedding = TextualInversion(
            name="ti", lr=embedding_lr, scale_lr=False, concept=concept, placeholder=placeholder,
            num_vectors=num_vectors, initializer_token=initializer_token,
        )  # fmt: skip
        if "." in self.embedding.placeholder:
            raise ConfigError(
                f"placeholder {self.embedding.placeholder!r}: a bundled embedding's name has no '.' (the webui splits "
                "keys there); set method.placeholder=<a-name-without-dots>"
            )
        self.lora = LoRA(name="lora", lr=lr, scale_lr=False, concept=concept, rank=rank, alpha=alpha,
                         target_modules=target_modules, text_encoder=text_encoder, init_from=init_from)  # fmt: skip
        if embedding_lr <= 0:
            raise ConfigError(f"method.embedding_lr={embedding_lr}: a rate must be positive")
        if embedding_steps is not None and embedding_steps < 0:
            raise ConfigError(
                f"method.embedding_steps={embedding_steps}: 0 or more steps (null = the whole run)"
            )
        self.embedding_lr, self.embedding_steps = embedding_lr, embedding_steps

    @property
    def prompt_text(self) -> str:
        return self.embedding.prompt_text

    @property
    def prompt_words(self) -> str:
        return self.embedding.prompt_text  # the word, beside <lora:name:m>

    @property
    def changes_text_encoding(self) -> bool:
        return True

    def attach(self, backbone: Backbone) -> None:
        self.embedding.attach(backbone)
        self.lora.attach(backbone)  # continues init_from's LoRA part (it ignores the bundle)
        if self.init_from:
            embedding = bundled_embedding(read_tensor_file(self.init_from), self.init_from)
            embedding.check_fits(backbone.text_widths, str(self.init_from))
            vectors = embedding.vectors
            if vectors.shape != self.embedding.vectors.shape:
                raise ConceptFileError(
                    f"{self.init_from}: its embedding is {tuple(vectors.shape)} but this run's is "
                    f"{tuple(self.embedding.vectors.shape)}: set method.num_vectors={vectors.shape[0]}"
                )
            with torch.no_grad():
                for ours, theirs in zip(self.embedding.vector_parts, embedding.parts):
                    ours.copy_(theirs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.embedding.vector_parts, *self.lora.trainable_parameters()]

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [
            (self.lora.trainable_parameters(), 1.0),
            (self.embedding.vector_parts, self.embedding_lr / self.lr_schedule[0][0]),
        ]

    def before_step(self, step: int) -> None:
        if self.embedding_steps is not None:  # the optimizer passes over a tensor without a gradient
            for vectors in self.embedding.vector_parts:
                vectors.requires_grad_(step < self.embedding_steps)

    def packed_modules(self, backbone: Backbone) -> list[str]:
        return self.embedding.packed_modules(backbone) + self.lora.packed_modules(backbone)

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        with self.lora.at_multiplier(multiplier):  # the word is the word; the strength is the LoRA's
            yield

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        tensors, metadata = kohya_lora(backbone, ADAPTER, self.concept, step)
        parts = [v.detach().to("cpu", torch.float32).contiguous() for v in self.embedding.vector_parts]
        word = f"{BUNDLE_PREFIX}{self.embedding.placeholder}"
        if len(parts) == 2:  # SDXL: the webui reads the two halves as it reads an SDXL embedding file
            tensors[f"{word}.clip_l"], tensors[f"{word}.clip_g"] = parts
        else:
            tensors[f"{word}.string_to_param.*"] = parts[0]
        bundle = write_safetensors(folder / f"{self.concept}.safetensors", tensors, metadata)
        return [
            bundle,
            *self.embedding.export(folder / "embedding", step, backbone),
            *self.lora.export(folder / "lora", step, backbone),
        ]

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> BundleConcept | None:
        if not file.is_safetensors or not isinstance(file.data, dict):
            return None
        keys = list(file.data)
        if not any(k.startswith(BUNDLE_PREFIX) for k in keys):
            return None
        embedding = bundled_embedding(file, file.path)
        lora = {k: v for k, v in file.data.items() if k.startswith(KOHYA_STARTS)}
        return BundleConcept(file.path.stem, file.path, embedding, lora)


def bundled_embedding(file: TensorFile, source: str | Path) -> Embedding:
    """The one embedding a LoRA file bundles (`bundle_emb.<word>.string_to_param.*` or `.emb_params`; SDXL's
    `.clip_l` and `.clip_g`)."""
    data = file.data if isinstance(file.data, dict) else {}
    bundled = {k.removeprefix(BUNDLE_PREFIX): v for k, v in data.items() if str(k).startswith(BUNDLE_PREFIX)}
    words = sorted({k.split(".", 1)[0] for k in bundled})
    if len(words) != 1:
        raise ConceptFileError(
            f"{source} bundles {len(words)} embeddings ({', '.join(words) or 'none'}); conceptlab reads a file with one"
        )
    parts = {k.split(".", 1)[1]: v for k, v in bundled.items()}
    clip_g = parts.get("clip_g")
    [vectors] = [v for k, v in parts.items() if k in ("string_to_param.*", "emb_params", "clip_l")] or [None]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in (vectors, clip_g) if v is not None) or (
        vectors is None or ("clip_l" in parts) != (clip_g is not None)
    ):
        raise ConceptFileError(
            f"{source}: the bundled embedding {words[0]!r} has no [N, width] vectors (SDXL: clip_l and clip_g)"
        )
    return Embedding(name=words[0], vectors=vectors.detach().float(), named_by_file=False,
                     sdxl_clip_g=None if clip_g is None else clip_g.detach().float())  # fmt: skip


class BundleConcept(Concept):
    """A LoRA with its embedding bundled: the word joins the tokenizer, `<lora:name:m>` scales the LoRA."""

    method = PivotalTuning

    def __init__(self, name: str, path: Path, embedding: Embedding, lora: dict[str, torch.Tensor]):
        super().__init__(name, path)
        self.word = EmbeddingConcept(embedding, path)
        self.lora = LoRAConcept(name, path, lora, tensors_only=True)

    @property
    def words(self) -> str:
        return self.word.token

    def install(self, backbone: Backbone) -> None:
        self.word.install(backbone)
        self.lora.install(backbone)

    def activate(self, multiplier: float) -> None:
        self.lora.activate(multiplier)

    def deactivate(self) -> None:
        self.lora.deactivate()

    def rewrite_prompt(self, text: str) -> str:
        return self.word.rewrite_prompt(text)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "word": self.word.token,
            "vectors": self.word.embedding.vectors.shape[0],
        }
