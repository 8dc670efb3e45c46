"""A run folder across the runs that use it (a SLURM requeue, a rerun into a fixed hydra.run.dir):
one run at a time, the same configuration, and a metrics history that only grows."""

from __future__ import annotations

import csv
import datetime
import fcntl
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only

from .errors import ConfigError


class RunFolderInUse(ConfigError):
    """Another run holds the run folder."""


log = logging.getLogger(__name__)
LOCK_FILE = ".conceptlab.lock"
# What atomic_path leaves when a process dies between writing and renaming.
STRAY_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
# The settings that make a checkpoint what it is; the others say how long or how to watch a run.
IDENTITY = ("method.", "data.", "model.", "optim.", "seed", "concept")


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this run; a second run started in it stops at once, naming the holder.

    A POSIX lock (works on NFS with a lock daemon, as clusters' shared file systems have it); the
    kernel releases it when the process dies, so a killed run never leaves the folder locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderInUse(
                f"run folder {run_dir} is in use by {holder}: wait for that run to end, or give this one "
                "another folder (hydra.run.dir=...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def remove_stray_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left beside its records and checkpoints."""
    stray = [p for p in run_dir.rglob(".*.tmp") if p.is_file() and STRAY_TEMPORARY.match(p.name)]
    for path in stray:
        path.unlink(missing_ok=True)
    if stray:
        log.info("removed %d temporary file(s) an earlier run left in %s", len(stray), run_dir)
    return stray


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every setting that makes a checkpoint what it is and differs."""
    from .sweeps import flatten

    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if k.startswith(IDENTITY))
    return [
        f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys if old.get(k) != new.get(k)
    ]


def check_checkpoint_safe(checkpoint: Path) -> None:
    """A checkpoint to continue from holds nothing but tensors and plain containers."""
    from .formats import refuse_unsafe_pickle

    refuse_unsafe_pickle(checkpoint, "continue from a checkpoint conceptlab wrote", ConfigError)


def check_same_configuration(checkpoint: Path, config: dict[str, Any], run_dir: Path) -> None:
    """A run folder's own checkpoint continues only the configuration that wrote it."""
    import torch

    check_checkpoint_safe(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("conceptlab", {}).get("config")
    if not saved:
        return
    differences = identity_differences(saved, config)
    if differences:
        shown = "; ".join(differences[:4]) + (
            f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
        )
        raise ConfigError(
            f"run folder {run_dir} holds the checkpoint of another configuration ({shown}): give this run "
            f"another folder, or delete {checkpoint.parent} to start this folder over"
        )


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSV logger (metrics.csv in the run folder), keeping the rows of earlier runs of the
    folder: a rerun or requeue appends, replacing only the rows from the step it resumes at on.

    Lightning deletes an existing metrics.csv when it starts writing; the earlier rows are moved to
    metrics.csv.previous first (never deleted) and written back ahead of the new ones."""

    def __init__(self, run_dir: Path):
        super().__init__(save_dir=str(run_dir), name=None, version="")
        self._history: list[dict[str, float]] | None = None
        if rank_zero_only.rank == 0:
            self._history = self._take_history(Path(run_dir))

    @staticmethod
    def _take_history(run_dir: Path) -> list[dict[str, float]]:
        current, previous = run_dir / "metrics.csv", run_dir / "metrics.csv.previous"
        rows = read_metrics(previous) if previous.is_file() else []  # a run that died before writing
        if current.is_file():
            rows += read_metrics(current)
            os.replace(current, previous)
        return rows

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._history is not None:
            history, self._history = self._history, None
            for row in history:
                if step is None or row.get("step", 0) < step:
                    self.experiment.log_metrics(
                        {k: v for k, v in row.items() if k != "step"}, int(row["step"])
                    )
        super().log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        super().save()
        previous = Path(self.log_dir) / "metrics.csv.previous"
        if self._history is None and (Path(self.log_dir) / "metrics.csv").is_file():
            previous.unlink(missing_ok=True)  # its rows are in metrics.csv now


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv, numbers as floats and empty cells left out."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            values = {}
            for key, value in row.items():
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "step" in values:
                rows.append(values)
    return rows
