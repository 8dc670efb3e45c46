"""Concept files, whatever method wrote them: read safely once, then recognised by the method whose
format they are.

This module knows no method's format. It reads a tensor file (safetensors with its metadata, or a
torch `.pt`/`.bin` through `weights_only` loading: nothing but tensors and plain containers is ever
unpickled) and writes files atomically; the method registry (`methods.read_concept`) asks each method
whether a file is one of its concepts. Each method's module holds its own readers and writers.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import ConceptFileError, ConceptLabError

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
    """Read a safetensors or torch file (or a webui embedding PNG) without running any code it might carry."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConceptFileError(f"concept file {path} does not exist")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return TensorFile(path, read_webui_image_embedding(path))
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except (SafetensorError, OSError) as err:
            raise ConceptFileError(f"{path} is not a readable safetensors file: {one_line(err)}") from err
        return TensorFile(path, data, metadata)
    try:
        # ParameterDict: the original textual-inversion code's embeddings hold one (the webui and
        # ComfyUI read them); a torch container of tensors, nothing that runs code of the file's choosing.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ConceptFileError(
            f"{path} could not be read as a tensor file (only tensors and plain containers are "
            f"loaded, never arbitrary pickled objects): {one_line(err)}"
        ) from err
    return TensorFile(path, data)


# Entries torch >= 2.x adds to its zip that AUTOMATIC1111's pickle check (on by default, for every
# torch.load in the webui) does not allow: it refuses the whole file ("bad file inside ...").
# torch reads files without them as before (they are optional records).
WEBUI_UNKNOWN_ENTRIES = (".format_version", ".storage_alignment")


IMAGE_SUFFIXES = (".png", ".webp")
WEBUI_IMAGE_CHUNK = "sd-ti-embedding"


def read_webui_image_embedding(path: Path) -> dict[str, Any]:
    """The embedding the webui's "save embedding as image" puts in a PNG's `sd-ti-embedding` text
    chunk: base64 of JSON whose tensors are {"TORCHTENSOR": nested lists}. JSON only: nothing runs."""

    def tensors(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"TORCHTENSOR"}:
            return torch.tensor(value["TORCHTENSOR"], dtype=torch.float32)
        if isinstance(value, dict):
            return {k: tensors(v) for k, v in value.items()}
        return value

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}) or image.info
            chunk = text.get(WEBUI_IMAGE_CHUNK)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ConceptFileError(f"{path} is not a readable image: {one_line(err)}") from err
    if not chunk:
        raise ConceptFileError(
            f"{path} has no {WEBUI_IMAGE_CHUNK!r} text chunk: conceptlab reads the webui's embedding images "
            "that carry it (embeddings hidden in the pixels are not read)"
        )
    try:
        data = json.loads(base64.b64decode(chunk))
        return tensors(data)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ConceptFileError(
            f"{path}: its {WEBUI_IMAGE_CHUNK!r} chunk is not a webui embedding: {one_line(err)}"
        ) from err


def write_torch_file(path: str | Path, data: Any) -> Path:
    """torch.save `data` (tensors and plain containers) atomically, as a zip that AUTOMATIC1111's
    default safety check accepts: only `<dir>/data.pkl`, `version`, `byteorder`, `data/<n>` and
    `.data/serialization_id` entries (and, inside data.pkl, only tensors, OrderedDict and builtins)."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    path = Path(path)
    with zipfile.ZipFile(buffer) as saved, atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for entry in saved.infolist():
                rest = entry.filename.partition("/")[2]
                if rest.rsplit("/", 1)[-1] not in WEBUI_UNKNOWN_ENTRIES:
                    # The archive's folder is named after the file, as torch.save(path) names it.
                    out.writestr(_renamed(entry, f"{path.stem}/{rest}"), saved.read(entry))
    return path


def _renamed(entry: zipfile.ZipInfo, name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=entry.date_time)
    info.compress_type = zipfile.ZIP_STORED
    return info


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """Save CPU copies of `tensors` in `dtype` (float32 unless said) as safetensors, atomically."""
    plain = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)
    return path


@contextmanager
def reading(path: str | Path, what: str = "concept file") -> Iterator[None]:
    """Any failure of a reader on malformed bytes becomes one line naming the file (a file can hold
    anything: readers index, unpack and decode what they find)."""
    try:
        yield
    except ConceptLabError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ConceptFileError(
            f"{path} is not a readable {what} ({type(err).__name__}: {one_line(err)})"
        ) from err


def refuse_unsafe_pickle(path: Path, fix: str, error: type[ConceptLabError] = ConceptFileError,
                         admitted: list | tuple = ()) -> None:  # fmt: skip
    """Stop with one line if a torch file holds globals beyond tensors and plain containers (and the
    `admitted` stand-ins), before anything unpickles it; torch's own refusal spans a page."""
    try:
        with torch.serialization.safe_globals(list(admitted)):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - not a torch zip at all
        raise error(f"{path} is not a readable torch file ({type(err).__name__}: {one_line(err)})") from None
    if unsafe:
        raise error(
            f"{path} holds Python objects that are not weights ({', '.join(unsafe[:3])}): conceptlab never "
            f"runs code from a file; {fix}"
        )


def one_line(err: BaseException) -> str:
    """An error's reason on one line (torch's weights_only refusals span a page: their reason is kept)."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", text, re.S)
    if unpickler:
        text = unpickler.group(1)
    return " ".join(text.split())[:300]


def read_as(path: str | Path, parse, what: str):
    """`parse(file)` of a tensor file, which must be `what` (parse returns None for other files)."""
    with reading(path, what):
        file = read_tensor_file(path)
        found = parse(file)
    if found is None:
        raise ConceptFileError(f"{file.path} is not {what}")
    return found


def concept_files(path: str | Path) -> list[Path]:
    """The concept files a path names: a file, a concepts/ folder, or a run directory.

    A run writes each concept in several formats under one name (`ink.safetensors`, `ink.pt`):
    the safetensors one is taken.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]  # any concept file, a webui embedding image too
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
