"""Textual inversion (Gal et al. 2022): a new pseudo-word whose embedding vectors are the only
trainable tensors.

The tokenizer gets the placeholder tokens (diffusers' convention: `<name>`, `<name>_1`, ... for N
vectors) and the text encoder's table a row for each, so the vocabulary is honest. Training does not
touch that table: its lookup is wrapped so the placeholder ids read the method's own [N, width]
parameter. The 49k frozen rows therefore get no gradient and no optimizer state, and stay
bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import ConceptFileError, ConfigError
from ..formats import read_embedding, write_a1111_embedding, write_diffusers_embedding
from .base import Method


class PlaceholderEmbedding(nn.Module):
    """The text encoder's frozen token table, with the placeholder ids looked up in the method's vectors."""

    def __init__(self, table: nn.Embedding, method: TextualInversion):
        super().__init__()
        self.table = table
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
        rows = method.vectors.to(embeds.dtype)[offset.clamp(0, method.num_vectors - 1)]
        return torch.where(is_new.unsqueeze(-1), rows, embeds)


class TextualInversion(Method):
    """Learn `num_vectors` embedding vectors for a new placeholder word."""

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
    ):
        super().__init__(name=name, lr=lr, scale_lr=scale_lr)
        if num_vectors < 1:
            raise ConfigError(f"method.num_vectors={num_vectors}: a placeholder needs at least 1 vector")
        self.concept = concept
        self.placeholder = placeholder or f"<{concept}>"
        if any(c.isspace() for c in self.placeholder):
            raise ConfigError(
                f"placeholder {self.placeholder!r} contains white space; use one word like <my-cat>"
            )
        self.num_vectors = num_vectors
        self.initializer_token = initializer_token
        self.init_from = init_from
        self.first_id = -1
        # Created by attach() once the text width is known (before any checkpoint is restored).
        self.vectors: nn.Parameter | None = None

    @property
    def tokens(self) -> list[str]:
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]

    @property
    def prompt_text(self) -> str:
        return " ".join(self.tokens)

    def attach(self, backbone: Backbone) -> None:
        tokenizer, text_encoder = backbone.tokenizer, backbone.text_encoder
        self._check_new_word(tokenizer)
        table = text_encoder.get_input_embeddings()
        init = self._initial_vectors(tokenizer, table.weight, backbone.context_dim)

        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(ids[0], ids[0] + self.num_vectors)):
            raise ConfigError(f"the placeholder tokens {self.tokens} did not get consecutive ids ({ids})")
        self.first_id = ids[0]
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[self.first_id : self.first_id + self.num_vectors] = init.to(table.weight.dtype)
        table.weight.requires_grad_(False)
        self.vectors = nn.Parameter(init.float().clone())
        text_encoder.set_input_embeddings(PlaceholderEmbedding(table, self))

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

    def _initial_vectors(self, tokenizer, table: torch.Tensor, width: int) -> torch.Tensor:
        if self.init_from:
            embedding = read_embedding(self.init_from)
            if embedding.width != width:
                raise ConceptFileError(
                    f"{self.init_from} holds {embedding.width}-wide vectors but this text encoder is "
                    f"{width} wide: the embedding was trained for another model family"
                )
            if embedding.vectors.shape[0] != self.num_vectors:
                raise ConceptFileError(
                    f"{self.init_from} holds {embedding.vectors.shape[0]} vectors; set "
                    f"method.num_vectors={embedding.vectors.shape[0]} to start from it"
                )
            return embedding.vectors
        ids = tokenizer(self.initializer_token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(
                f"method.initializer_token={self.initializer_token!r} is {len(ids)} tokens; it must be "
                "exactly one existing token (a single common word such as 'cat' or 'painting')"
            )
        return table[ids[0]].detach().float().repeat(self.num_vectors, 1)

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        vectors = self.vectors.detach()
        return [
            write_diffusers_embedding(folder / f"{self.concept}.safetensors", self.placeholder, vectors),
            write_a1111_embedding(
                folder / f"{self.concept}.pt",
                name=self.concept,
                vectors=vectors,
                step=step,
                sd_checkpoint=None,
                sd_checkpoint_name=backbone.name,
            ),
        ]
