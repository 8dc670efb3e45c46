"""Textual inversion (Gal et al. 2022): a new pseudo-word whose embedding vectors are the only
trainable tensors.

The tokenizer gets the placeholder tokens (diffusers' convention: `<name>`, `<name>_1`, ... for N
vectors) and the text encoder's table a row for each, so the vocabulary is honest. Training does not
touch that table: its lookup is wrapped so the placeholder ids read the method's own [N, width]
parameter. The 49k frozen rows therefore get no gradient and no optimizer state, and stay
bit-identical.

On SDXL the word gets vectors in both text encoders ([N, 768] and [N, 1280]), trained together, and is
written as the file kohya, the webui and ComfyUI read (`clip_l`, `clip_g`) and as diffusers' pair of
files (one per encoder, each loaded with its own `load_textual_inversion`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import (
    IMAGE_SUFFIXES,
    TensorFile,
    read_as,
    write_safetensors,
    write_torch_file,
)
from .base import Concept, Method, MethodConfig, method_key

# diffusers' SDXL textual-inversion script writes each text encoder's vectors to a file of its own.
DIFFUSERS_SDXL_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
# AUTOMATIC1111 writes the token id of "*" in CLIP's vocabulary here; it is informational only.
A1111_STAR_TOKEN = 265


@dataclass
class TextualInversionConfig(MethodConfig):
    """Textual inversion: a new pseudo-word whose embedding vectors are the only trainable tensors."""

    _target_: str = "conceptlab.methods.textual_inversion.TextualInversion"
    name: str = method_key("name", "ti")
    placeholder: str | None = opt(
        None, 'the new word; null = "<concept>"; extra vectors are "<concept>_1", "<concept>_2", ...'
    )
    num_vectors: int = opt(
        1, "vectors per placeholder (1..N; with the longest template they fit in 77 tokens)", valid="[1, 75]"
    )
    initializer_token: str = opt("object", "one existing token whose embedding starts every vector")
    init_from: str | None = method_key(
        "init_from", None, "start from an embedding file (diffusers .safetensors/.bin, AUTOMATIC1111 .pt)"
    )
    lr: Any = method_key(
        "lr", 5.0e-4, 'base learning rate, or an AUTOMATIC1111 schedule "5e-3:100, 1e-3:1000, 5e-4"'
    )
    scale_lr: bool = method_key(
        "scale_lr", True, "lr x batch size x devices x nodes x grad accumulation (the TI paper's rule)"
    )
    lr_2: float | None = opt(
        None,
        "SDXL: the rate of the second text encoder's vectors (clip_g), scaled and scheduled as method.lr; "
        "null = method.lr",
        valid="(0, inf)",
    )


@dataclass
class Embedding:
    """A learned pseudo-word: its name and its vectors [num_vectors, width]."""

    name: str
    vectors: torch.Tensor
    step: int | None = None
    # AUTOMATIC1111's files are called by their file name (the trigger word); diffusers files by their token.
    named_by_file: bool = False
    # An SDXL embedding's second part (clip_g); `vectors` then holds its clip_l part.
    sdxl_clip_g: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]

    @property
    def parts(self) -> list[torch.Tensor]:
        """The vectors of each text encoder: one part, or SDXL's clip_l and clip_g."""
        return [self.vectors] if self.sdxl_clip_g is None else [self.vectors, self.sdxl_clip_g]

    def check_fits(self, widths: list[int], source: str) -> None:
        """Raise unless these vectors fit text encoders `widths` wide (SDXL: two)."""
        have = [part.shape[-1] for part in self.parts]
        if have == list(widths):
            return
        if len(have) == 2:
            raise ConceptFileError(
                f"{source} is an SDXL embedding (clip_l {have[0]} + clip_g {have[1]} wide); this backbone is "
                f"Stable Diffusion 1.x/2.x ({widths[0]}-wide text encoder): use an embedding trained for it"
            )
        if len(widths) == 2:
            raise ConceptFileError(
                f"{source} holds {have[0]}-wide vectors (an SD 1.x/2.x embedding); this SDXL backbone needs two "
                f"parts, clip_l {widths[0]} and clip_g {widths[1]} wide: use an embedding trained for SDXL"
            )
        raise ConceptFileError(
            f"{source} holds {have[0]}-wide vectors but this model's text encoder is {widths[0]} wide: "
            "it was trained for another model family (SD 1.x: 768, SD 2.x: 1024)"
        )


def write_sdxl_embedding(path: str | Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """An SDXL embedding as kohya, the webui and ComfyUI write and read it ({clip_l: [N, 768], clip_g:
    [N, 1280]}), written atomically."""
    return write_safetensors(path, {"clip_l": clip_l, "clip_g": clip_g})


def write_diffusers_embedding(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """A diffusers textual-inversion file ({token: [N, dim]}), written atomically."""
    return write_safetensors(path, {token: vectors})


def write_a1111_embedding(path: str | Path, name: str, vectors: torch.Tensor, step: int,
                          sd_checkpoint: str | None, sd_checkpoint_name: str | None) -> Path:  # fmt: skip
    """An AUTOMATIC1111 embedding (.pt), written atomically."""
    return write_torch_file(path, {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": vectors.detach().to("cpu", torch.float32).contiguous()},
        "name": name,
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    })  # fmt: skip


def read_embedding(path: str | Path) -> Embedding:
    """A textual-inversion embedding in diffusers' or AUTOMATIC1111's format."""
    return read_as(
        path, embedding_from,
        "an embedding: neither a diffusers embedding (one tensor under the token's name) nor an "
        "AUTOMATIC1111 one (string_to_param); hypernetwork and LoRA files are not embeddings",
    )  # fmt: skip


def embedding_from(file: TensorFile) -> Embedding | None:
    """The embedding a file holds (diffusers: its token; AUTOMATIC1111: the file name), or None."""
    data, path = file.data, file.path
    clip_g = None
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):  # the original textual-inversion code's files
            params = dict(params.items())
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptFileError(
                f"{path}: an AUTOMATIC1111 embedding holds exactly one entry in string_to_param"
            )
        vectors = next(iter(params.values()))
        name, step = path.stem, data.get("step")
        if path.suffix.lower() in IMAGE_SUFFIXES and isinstance(data.get("name"), str):
            name = data["name"]  # the webui calls an embedding image by the name stored in it
    elif isinstance(data, dict) and "emb_params" in data:  # kohya's sd-scripts
        vectors, name, step = data["emb_params"], path.stem, data.get("step")
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):  # SDXL (kohya, the webui)
        vectors, clip_g, name, step = data["clip_l"], data["clip_g"], path.stem, None
    elif isinstance(data, dict) and {"clip_l", "clip_g"} & set(data):
        have = "clip_l" if "clip_l" in data else "clip_g"
        missing = "clip_g" if have == "clip_l" else "clip_l"
        raise ConceptFileError(
            f"{path}: an SDXL embedding holds clip_l and clip_g, and this one has no {missing} (only {have}); "
            "write both halves into the file"
        )
    elif (
        isinstance(data, dict) and len(data) == 1 and not file.metadata.get("format")
        and isinstance(next(iter(data.values())), torch.Tensor)
    ):  # fmt: skip
        name, vectors = next(iter(data.items()))
        step = None
    else:
        return None
    if isinstance(clip_g, torch.Tensor) and (
        not isinstance(vectors, torch.Tensor) or clip_g.shape[:-1] != vectors.shape[:-1]
    ):
        raise ConceptFileError(
            f"{path}: its clip_l {tuple(getattr(vectors, 'shape', ()))} and clip_g {tuple(clip_g.shape)} hold "
            "different numbers of vectors; an SDXL embedding has as many of each"
        )
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2):
        raise ConceptFileError(
            f"{path}: expected embedding vectors of shape [N, width], got {getattr(vectors, 'shape', vectors)}"
        )
    vectors = vectors.detach().to("cpu", torch.float32)
    if not torch.isfinite(vectors).all():
        raise ConceptFileError(f"{path} holds NaN or infinite values: it was saved from a diverged run")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if isinstance(clip_g, torch.Tensor):
        clip_g = clip_g.detach().to("cpu", torch.float32).reshape(vectors.shape[0], -1)
        if not torch.isfinite(clip_g).all():
            raise ConceptFileError(f"{path} holds NaN or infinite values: it was saved from a diverged run")
    return Embedding(
        name=str(name), vectors=vectors, step=int(step) if step is not None else None,
        named_by_file=not (isinstance(data, dict) and str(name) in data), sdxl_clip_g=clip_g,
    )  # fmt: skip


class PlaceholderEmbedding(nn.Module):
    """A text encoder's frozen token table, with the placeholder ids looked up in the method's vectors
    (`part`: the text encoder's, 0 or SDXL's second, 1)."""

    def __init__(self, table: nn.Embedding, method: TextualInversion, part: int = 0):
        super().__init__()
        self.table = table
        self.part = part
        # Not registered as a submodule: the vectors belong to the method, so casting the backbone
        # or saving its state never touches them.
        object.__setattr__(self, "_method", method)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)
        method = self._method
        offset = input_ids - method.first_id
        is_new = (offset >= 0) & (offset < method.num_vectors)
        vectors = method.vectors if self.part == 0 else method.vectors_2
        rows = vectors.to(embeds.dtype)[offset.clamp(0, method.num_vectors - 1)]
        return torch.where(is_new.unsqueeze(-1), rows, embeds)


class TextualInversion(Method):
    """Learn `num_vectors` embedding vectors for a new placeholder word."""

    Config = TextualInversionConfig
    file_formats = (
        "diffusers embedding (.safetensors/.bin), AUTOMATIC1111 embedding (.pt, or a .png from its "
        "'save embedding as image'), the original textual-inversion code's .pt, kohya's emb_params, SDXL clip_l/clip_g"
    )

    def __init__(
        self,
        name: str,
        lr: float,
        scale_lr: bool,
        concept: str,
        placeholder: str | None = None,
        num_vectors: int = 1,
        initializer_token: str = "object",
        init_from: str | None = None,
        lr_2: float | None = None,
    ):
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        self.lr_2 = lr_2
        if num_vectors < 1:
            raise ConfigError(f"method.num_vectors={num_vectors}: a placeholder needs at least 1 vector")
        self.placeholder = placeholder or f"<{concept}>"
        if any(c.isspace() for c in self.placeholder):
            raise ConfigError(
                f"placeholder {self.placeholder!r} contains white space; use one word like <my-cat>"
            )
        self.num_vectors = num_vectors
        self.initializer_token = initializer_token
        self.first_id = -1
        # Created by attach() once the text widths are known (before any checkpoint is restored); SDXL's
        # second text encoder's in vectors_2.
        self.vectors: nn.Parameter | None = None
        self.vectors_2: nn.Parameter | None = None

    @property
    def tokens(self) -> list[str]:
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]

    @property
    def prompt_text(self) -> str:
        return " ".join(self.tokens)

    def attach(self, backbone: Backbone) -> None:
        for tokenizer in backbone.tokenizers:
            self._check_new_word(tokenizer)
        init = self._initial_vectors(backbone)
        for part, (tokenizer, text_encoder) in enumerate(zip(backbone.tokenizers, backbone.text_encoders)):
            # Words attached before this one (several concepts trained together) wrap the table: the bare
            # table is resized, and they wrap this word's lookup in turn.
            before = []
            while isinstance(text_encoder.get_input_embeddings(), PlaceholderEmbedding):
                before.append(text_encoder.get_input_embeddings())
                text_encoder.set_input_embeddings(before[-1].table)
            # This backbone's own parameter object for the table (its tensor stays shared until the resize
            # below replaces it): transformers resizes in place (`weight.data = ...`), and a packed sweep's
            # jobs hold the same parameter objects, so one job's new words would resize every job's table.
            table = text_encoder.get_input_embeddings()
            table.weight = nn.Parameter(table.weight.detach(), requires_grad=False)
            tokenizer.add_tokens(self.tokens)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            if ids != list(range(ids[0], ids[0] + self.num_vectors)) or part and ids[0] != self.first_id:
                raise ConfigError(
                    f"the placeholder tokens {self.tokens} did not get consecutive ids, the same in every "
                    f"tokenizer ({ids})"
                )
            self.first_id = ids[0]
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = text_encoder.get_input_embeddings()
            with torch.no_grad():
                table.weight[self.first_id : self.first_id + self.num_vectors] = init[part].to(
                    table.weight.dtype
                )
            table.weight.requires_grad_(False)
            setattr(self, "vectors_2" if part else "vectors", nn.Parameter(init[part].float().clone()))
            lookup = PlaceholderEmbedding(table, self, part)
            for outer in reversed(before):
                outer.table, lookup = lookup, outer
            text_encoder.set_input_embeddings(lookup)

    @property
    def vector_parts(self) -> list[nn.Parameter]:
        """The vectors of each text encoder: `vectors`, and SDXL's `vectors_2`."""
        return [self.vectors] if self.vectors_2 is None else [self.vectors, self.vectors_2]

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        if self.vectors_2 is None or self.lr_2 is None:
            return super().parameter_groups()
        return [([self.vectors], 1.0), ([self.vectors_2], self.lr_2 / self.lr_schedule[0][0])]

    def packed_modules(self, backbone: Backbone) -> list[str]:
        return [
            f"{part}.{name}"
            for part, encoder in zip(backbone.text_parts, backbone.text_encoders)
            for name, module in encoder.named_modules()
            if isinstance(module, PlaceholderEmbedding) and module._method is self
        ]

    def _check_new_word(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        taken = [t for t in self.tokens if t in vocab]
        if not taken:
            ids = tokenizer(self.placeholder, add_special_tokens=False).input_ids
            if len(ids) == 1:  # the bare word is already a single token ("cat")
                taken = [self.placeholder]
        if taken:
            raise ConfigError(
                f"placeholder {taken[0]!r} is already in the tokenizer's vocabulary; choose a new word "
                f"(method.placeholder=<my-{self.concept}>, say)"
            )

    def _initial_vectors(self, backbone: Backbone) -> list[torch.Tensor]:
        """The starting vectors of each text encoder: init_from's, or the initializer token's row."""
        if self.init_from:
            embedding = read_embedding(self.init_from)
            embedding.check_fits(backbone.text_widths, str(self.init_from))
            if embedding.vectors.shape[0] != self.num_vectors:
                raise ConceptFileError(
                    f"{self.init_from} holds {embedding.vectors.shape[0]} vectors; set "
                    f"method.num_vectors={embedding.vectors.shape[0]} to start from it"
                )
            return embedding.parts
        ids = backbone.tokenizer(self.initializer_token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(
                f"method.initializer_token={self.initializer_token!r} is {len(ids)} tokens; it must be "
                "exactly one existing token (a single common word such as 'cat' or 'painting')"
            )
        return [
            encoder.get_input_embeddings().weight[ids[0]].detach().float().repeat(self.num_vectors, 1)
            for encoder in backbone.text_encoders
        ]

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        vectors = self.vectors.detach()
        if self.vectors_2 is not None:  # SDXL: the tools' one file, and diffusers' two
            clip_g = self.vectors_2.detach()
            return [
                write_sdxl_embedding(folder / f"{self.concept}.safetensors", vectors, clip_g),
                write_diffusers_embedding(
                    folder / "diffusers" / DIFFUSERS_SDXL_FILES[0], self.placeholder, vectors
                ),
                write_diffusers_embedding(
                    folder / "diffusers" / DIFFUSERS_SDXL_FILES[1], self.placeholder, clip_g
                ),
            ]
        return [
            write_diffusers_embedding(folder / f"{self.concept}.safetensors", self.placeholder, vectors),
            write_a1111_embedding(
                folder / f"{self.concept}.pt",
                name=self.concept,
                vectors=vectors,
                step=step,
                sd_checkpoint=backbone.checkpoint_hash,
                sd_checkpoint_name=backbone.checkpoint_name,
            ),
        ]

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> EmbeddingConcept | None:
        embedding = embedding_from(file)
        if embedding is None:
            return None
        # diffusers files carry their token; AUTOMATIC1111 files are called by their file name.
        return EmbeddingConcept(embedding, file.path)


class EmbeddingConcept(Concept):
    """A learned word: its vectors join the tokenizer and the text encoder (diffusers' loader).

    As in the webui, an AUTOMATIC1111 file is triggered by its file name; where that name is already
    a word of the vocabulary ("robot"), the word is bound to a new token `<robot>` and the prompt's
    whole-word uses of it are rewritten to that token."""

    method = TextualInversion

    def __init__(self, embedding: Embedding, path: Path):
        super().__init__(embedding.name, path)
        self.embedding = embedding
        self.token = embedding.name

    def install(self, backbone: Backbone) -> None:
        self.embedding.check_fits(backbone.text_widths, f"embedding {self.name!r} ({self.path})")
        if _is_a_word(backbone.tokenizer, self.name):
            if not self.embedding.named_by_file:
                raise ConceptFileError(
                    f"embedding {self.name!r} ({self.path}) uses a token that is already a word of the vocabulary; "
                    "it cannot be told apart from that word"
                )
            self.token = f"<{self.name}>"
            if _is_a_word(backbone.tokenizer, self.token):
                raise ConceptFileError(
                    f"embedding {self.name!r} ({self.path}): both {self.name!r} and {self.token!r} are taken; rename the file"
                )
        pipe = backbone.pipeline()
        for tokenizer, encoder, vectors in zip(
            backbone.tokenizers, backbone.text_encoders, self.embedding.parts
        ):
            # One load per text encoder, as diffusers needs for SDXL (each with its own tokenizer).
            pipe.load_textual_inversion({self.token: vectors}, token=self.token, text_encoder=encoder,
                                        tokenizer=tokenizer)  # fmt: skip

    def rewrite_prompt(self, text: str) -> str:
        if self.embedding.named_by_file and self.token != f"<{self.name}>":
            # conceptlab's own spelling of a trained word, <name>, calls a file-named embedding too (an
            # SDXL run's clip_l/clip_g file, as train.py's hint writes it)
            text = text.replace(f"<{self.name}>", self.token)
        if self.token == self.name:
            return text
        return re.sub(rf"(?<![\w<-]){re.escape(self.name)}(?![\w>-])", self.token, text)

    def describe(self) -> dict:
        described = {**super().describe(), "vectors": self.embedding.vectors.shape[0], "trigger": self.name}
        if self.token != self.name:
            described["token"] = self.token
        return described


def _is_a_word(tokenizer, text: str) -> bool:
    """Whether `text` is already in the vocabulary, or one existing token."""
    return text in tokenizer.get_vocab() or len(tokenizer(text, add_special_tokens=False).input_ids) == 1
