"""Learned-concept files in the formats users already own.

Textual-inversion embeddings:
* diffusers: a safetensors (or torch .bin) file holding one tensor [N, dim] under the placeholder
  token's name; `StableDiffusionPipeline.load_textual_inversion` names the extra vectors
  `<token>_1`, `<token>_2`, ...
* AUTOMATIC1111: a torch .pt dict with `string_to_token` {'*': 265}, `string_to_param` {'*': [N, dim]},
  `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name` (modules/textual_inversion/textual_inversion.py);
  the file's stem is the word used in prompts.
Files are read with `weights_only` loading: nothing but tensors and plain containers is unpickled.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import ConceptFileError

# A1111 writes the token id of "*" in CLIP's vocabulary here; it is informational only.
A1111_STAR_TOKEN = 265


@dataclass
class Embedding:
    """A learned pseudo-word: its name and its vectors [num_vectors, width]."""

    name: str
    vectors: torch.Tensor
    step: int | None = None

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]


def write_diffusers_embedding(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """Write a diffusers textual-inversion file ({token: [N, dim]}) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({token: vectors.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
    return path


def write_a1111_embedding(
    path: str | Path,
    name: str,
    vectors: torch.Tensor,
    step: int,
    sd_checkpoint: str | None,
    sd_checkpoint_name: str | None,
) -> Path:
    """Write an AUTOMATIC1111 embedding (.pt) atomically."""
    data = {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": vectors.detach().to("cpu", torch.float32).contiguous()},
        "name": name,
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def read_embedding(path: str | Path) -> Embedding:
    """Read a textual-inversion embedding in diffusers' or AUTOMATIC1111's format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptFileError(f"embedding file {path} does not exist")
    data = _load_tensors(path)
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptFileError(
                f"{path}: an AUTOMATIC1111 embedding holds exactly one entry in string_to_param"
            )
        vectors = next(iter(params.values()))
        name, step = path.stem, data.get("step")
    elif isinstance(data, dict) and "emb_params" in data:
        vectors, name, step = data["emb_params"], path.stem, data.get("step")
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        name, vectors = next(iter(data.items()))
        step = None
    else:
        raise ConceptFileError(
            f"{path} is neither a diffusers embedding (one tensor under the token's name) nor an "
            "AUTOMATIC1111 one (string_to_param); hypernetwork and LoRA files are not embeddings"
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
    return Embedding(name=str(name), vectors=vectors, step=int(step) if step is not None else None)


def _load_tensors(path: Path) -> object:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ConceptFileError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ConceptFileError(
            f"{path} could not be read as a tensor file (only tensors and plain containers are "
            f"loaded, never arbitrary pickled objects): {err}"
        ) from err
