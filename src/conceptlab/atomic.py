"""Writes that never leave a half-written file: write beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    # Created here to learn the permissions any new file gets (umask): mkstemp and some writers
    # (safetensors) use 0600, which would hide run records from the rest of a group.
    tmp_path.open("xb").close()
    mode = tmp_path.stat().st_mode
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(target, json.dumps(data, indent=2, default=str) + "\n")
