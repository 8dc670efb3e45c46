"""Evaluations computed once: a result is stored on disk under a key made of everything it depends on
(the backbone's weights, the learned state as it is at that moment, prompts, seeds, sampler settings,
the scorer), so runs and sweeps that would compute the same thing again read it instead.

What repeats in practice: the bare model (a method with a strength at multiplier 0), and step 0 of
runs that start from the same state (textual inversion from the same initializer word, a hypernetwork
or LoRA from the same seed). A key that differs in anything is a different entry: a cached result is
exactly what computing it would give (same device type and dtype).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, write_json

log = logging.getLogger(__name__)
VERSION = 1  # bump when what an entry holds changes


def tensors_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 of named tensors' names, shapes, dtypes and exact bytes."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def method_state(method, multiplier: float) -> str:
    """What the learned method contributes at `multiplier`: nothing at 0 for a method with a strength
    (x + f(x) * 0 is the bare model, whatever was learned), else its exact tensors and prompt text."""
    if method.has_multiplier and multiplier == 0:
        return "bare"
    named = sorted(method.state_dict().items())
    trainable = [(f"trainable.{i}", p) for i, p in enumerate(method.trainable_parameters())]
    return f"{type(method).__name__}|{method.prompt_text}|{multiplier!r}|{tensors_digest(named + trainable)}"


def backbone_identity(backbone) -> dict[str, Any]:
    """The frozen weights a sample depends on, and where they run."""
    return {
        "path": str(backbone.path),
        "weights": backbone.checkpoint_hash,  # the checkpoint file's hash, or its folder's UNet weights'
        "dtype": str(backbone.unet.dtype),
        "device": backbone.unet.device.type,
    }


class EvaluationCache:
    """Results under `folder/<key[:2]>/<key>.json` (scores) or `<key><suffix>` (images), written
    atomically (parallel jobs are safe)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(
            json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str).encode()
        ).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text())["value"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged entry is recomputed
            log.warning("ignoring the unreadable cached evaluation %s (%s)", path, err)
            return None

    def get_bytes(self, key: str, suffix: str) -> bytes | None:
        try:
            return (self.folder / key[:2] / f"{key}{suffix}").read_bytes()
        except OSError:
            return None

    def put_bytes(self, key: str, suffix: str, data: bytes) -> None:
        try:
            with atomic_path(self.folder / key[:2] / f"{key}{suffix}") as tmp:
                tmp.write_bytes(data)
        except OSError as err:
            log.warning("could not keep an evaluation in %s (%s)", self.folder, err)

    def put(self, key: str, value: Any, about: dict[str, Any] | None = None) -> None:
        try:
            write_json(self._path(key), {"value": value, "about": about or {}})
        except OSError as err:  # a full or read-only cache never fails a run
            log.warning("could not keep an evaluation in %s (%s)", self.folder, err)


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """`<CONCEPTLAB_CACHE or cache_dir or ~/.cache/conceptlab>/evaluations`."""
    root = os.environ.get("CONCEPTLAB_CACHE") or cache_dir or "~/.cache/conceptlab"
    return Path(root).expanduser() / "evaluations"
