"""Learned-concept files in the formats users already own.

Textual-inversion embeddings:
* diffusers: a safetensors (or torch .bin) file holding one tensor [N, dim] under the placeholder
  token's name; `StableDiffusionPipeline.load_textual_inversion` names the extra vectors
  `<token>_1`, `<token>_2`, ...
* AUTOMATIC1111: a torch .pt dict with `string_to_token` {'*': 265}, `string_to_param` {'*': [N, dim]},
  `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name` (modules/textual_inversion/textual_inversion.py);
  the file's stem is the word used in prompts.
Hypernetworks:
* AUTOMATIC1111 (`.pt`, for its models/hypernetworks/ folder): integer width keys holding a
  (key-module, value-module) pair of state dicts, plus `layer_structure`, `activation_func`,
  `is_layer_norm`, `weight_initialization`, `activate_output`, `use_dropout`, `dropout_structure`,
  `last_layer_dropout`, `step`, `name`, `sd_checkpoint`, `sd_checkpoint_name`, `optional_info`.
  Read with A1111's defaults for missing keys (a file without `activate_output` means True) and its
  legacy `linear1`/`linear2` key names.
* conceptlab's safetensors twin: tensors `"<width>.k.<param>"` / `"<width>.v.<param>"`, the structure
  as JSON in the metadata.
Files are read with `weights_only` loading: nothing but tensors and plain containers is unpickled.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
    return _embedding_from(_load_tensors(path), path)


def _embedding_from(data: object, path: Path) -> Embedding:
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


HYPERNETWORK_STRUCTURE_KEYS = (
    "layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "activate_output",
    "use_dropout", "dropout_structure", "last_layer_dropout",
)  # fmt: skip
SAFETENSORS_FORMAT = "conceptlab-hypernetwork"
LEGACY_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip


@dataclass
class HypernetworkFile:
    """A hypernetwork read from disk: its name, structure and (key, value) state dicts per width."""

    name: str
    structure: dict[str, Any]
    pairs: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.pairs)


def hypernetwork_structure(hypernetwork) -> dict[str, Any]:
    """The structure keys A1111 writes, from a conceptlab Hypernetwork."""
    return {
        "layer_structure": list(hypernetwork.layer_structure),
        "activation_func": hypernetwork.activation_func,
        "is_layer_norm": hypernetwork.add_layer_norm,
        "weight_initialization": hypernetwork.weight_initialization,
        "activate_output": hypernetwork.activate_output,
        "use_dropout": hypernetwork.use_dropout,
        "dropout_structure": list(hypernetwork.dropout_structure),
        "last_layer_dropout": hypernetwork.last_layer_dropout,
    }


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}


def write_a1111_hypernetwork(path: str | Path, hypernetwork, step: int, sd_checkpoint: str | None,
                             sd_checkpoint_name: str | None) -> Path:  # fmt: skip
    """Write an AUTOMATIC1111 hypernetwork (.pt) atomically."""
    data: dict[Any, Any] = {
        size: (_plain_state(hypernetwork.pair(size)[0]), _plain_state(hypernetwork.pair(size)[1]))
        for size in hypernetwork.sizes
    }
    data.update(
        step=int(step), name=hypernetwork.concept, sd_checkpoint=sd_checkpoint,
        sd_checkpoint_name=sd_checkpoint_name, optional_info=None, **hypernetwork_structure(hypernetwork),
    )  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def write_hypernetwork_safetensors(
    path: str | Path, hypernetwork, step: int, sd_checkpoint_name: str | None
) -> Path:
    """Write the safetensors twin of a hypernetwork (structure in the metadata) atomically."""
    tensors = {}
    for size in hypernetwork.sizes:
        for role, module in zip(("k", "v"), hypernetwork.pair(size)):
            tensors.update({f"{size}.{role}.{k}": v for k, v in _plain_state(module).items()})
    metadata = {key: json.dumps(value) for key, value in hypernetwork_structure(hypernetwork).items()}
    metadata.update(format=SAFETENSORS_FORMAT, name=hypernetwork.concept, step=str(int(step)),
                    sd_checkpoint_name=json.dumps(sd_checkpoint_name))  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_concept(path: str | Path) -> Embedding | HypernetworkFile:
    """Read a concept file of either kind, deciding from its content (each file is read once)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptFileError(f"concept file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:  # reads the header only
                is_hypernetwork = (f.metadata() or {}).get("format") == SAFETENSORS_FORMAT
        except (SafetensorError, OSError) as err:
            raise ConceptFileError(f"{path} is not a readable safetensors file: {err}") from err
        return _read_hypernetwork_safetensors(path) if is_hypernetwork else read_embedding(path)
    data = _load_tensors(path)
    if isinstance(data, dict) and any(isinstance(k, int) for k in data):
        return _hypernetwork_from(data, path)
    return _embedding_from(data, path)


def read_hypernetwork(path: str | Path) -> HypernetworkFile:
    """Read a hypernetwork in AUTOMATIC1111's format or conceptlab's safetensors twin."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptFileError(f"hypernetwork file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_hypernetwork_safetensors(path)
    return _hypernetwork_from(_load_tensors(path), path)


def _hypernetwork_from(data: object, path: Path) -> HypernetworkFile:
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        raise ConceptFileError(f"{path} is not an AUTOMATIC1111 hypernetwork (no integer width keys)")
    pairs = {}
    for size, value in data.items():
        if isinstance(size, int):
            if not (
                isinstance(value, tuple | list)
                and len(value) == 2
                and all(isinstance(v, dict) for v in value)
            ):
                raise ConceptFileError(f"{path}: width {size} should hold a (key, value) pair of state dicts")
            pairs[size] = tuple({LEGACY_KEYS.get(k, k): t for k, t in part.items()} for part in value)
    # AUTOMATIC1111's defaults for keys older files lack.
    structure = {
        "layer_structure": data.get("layer_structure") or [1, 2, 1],
        "activation_func": data.get("activation_func"),
        "is_layer_norm": data.get("is_layer_norm", False),
        "weight_initialization": data.get("weight_initialization", "Normal"),
        "activate_output": data.get("activate_output", True),
        "use_dropout": data.get("use_dropout", False),
        "dropout_structure": data.get("dropout_structure"),
        "last_layer_dropout": data.get("last_layer_dropout", False),
    }
    extra = {k: data.get(k) for k in ("sd_checkpoint", "sd_checkpoint_name", "optional_info")}
    return HypernetworkFile(str(data.get("name") or path.stem), structure, pairs, data.get("step"), extra)


def _read_hypernetwork_safetensors(path: Path) -> HypernetworkFile:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError) as err:
        raise ConceptFileError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise ConceptFileError(
            f"{path} is not a conceptlab hypernetwork (its metadata has no format={SAFETENSORS_FORMAT})"
        )
    pairs: dict[int, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        size, role, param = key.split(".", 2)
        pairs.setdefault(int(size), ({}, {}))[0 if role == "k" else 1][param] = tensor
    structure = {key: json.loads(metadata[key]) for key in HYPERNETWORK_STRUCTURE_KEYS}
    return HypernetworkFile(metadata.get("name", path.stem), structure, pairs, int(metadata.get("step", 0)))
