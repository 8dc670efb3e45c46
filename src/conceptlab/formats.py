"""Concept files, whatever method wrote them: read safely once, then recognised by the method whose
format they are.

This module knows no method's format. It reads a tensor file (safetensors with its metadata, or a
torch `.pt`/`.bin` through `weights_only` loading: nothing but tensors and plain containers is ever
unpickled), writes files atomically, and asks each registered method (`methods.registered_methods`)
whether a file is one of its concepts. Each method's module holds its own readers and writers.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import ConceptFileError

if TYPE_CHECKING:
    from .methods.base import Concept

CONCEPT_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass
class TensorFile:
    """A concept file's content: `data` (a dict of tensors, or the unpickled plain containers of a
    torch file) and, for safetensors, the header's string metadata."""

    path: Path
    data: Any
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"


def read_tensor_file(path: str | Path) -> TensorFile:
    """Read a safetensors or torch file without running any code it might carry."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptFileError(f"concept file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except (SafetensorError, OSError) as err:
            raise ConceptFileError(f"{path} is not a readable safetensors file: {err}") from err
        return TensorFile(path, data, metadata)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ConceptFileError(
            f"{path} could not be read as a tensor file (only tensors and plain containers are "
            f"loaded, never arbitrary pickled objects): {err}"
        ) from err
    return TensorFile(path, data)


def write_torch_file(path: str | Path, data: Any) -> Path:
    """torch.save `data` (tensors and plain containers) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Save float32 CPU copies of `tensors` as safetensors, atomically."""
    plain = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)
    return path


def read_concept(path: str | Path) -> Concept:
    """The learned concept in a file, recognised by the method whose format it is."""
    from .methods import registered_methods

    file = read_tensor_file(path)
    for method in registered_methods().values():
        concept = method.concept_from_file(file)
        if concept is not None:
            return concept
    known = "; ".join(f"{name}: {cls.file_formats}" for name, cls in registered_methods().items())
    raise ConceptFileError(f"{file.path} is not a concept file of any method conceptlab knows ({known})")


def concept_files(path: str | Path) -> list[Path]:
    """The concept files a path names: a file, a concepts/ folder, or a run directory.

    A run writes each concept in several formats under one name (`ink.safetensors`, `ink.pt`):
    the safetensors one is taken.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConceptFileError(f"concept {path} does not exist (give a concept file or a run directory)")
    folder = path / "concepts" if (path / "concepts").is_dir() else path
    chosen: dict[str, Path] = {}
    for file in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CONCEPT_SUFFIXES):
        if file.stem not in chosen or file.suffix == ".safetensors":
            chosen[file.stem] = file
    if not chosen:
        raise ConceptFileError(f"no concept files ({', '.join(CONCEPT_SUFFIXES)}) in {folder}")
    return sorted(chosen.values())
