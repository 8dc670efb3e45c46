"""A run's folder: every path a run writes or reads (`RunFolder`), which concept files it kept, where
runs are found, and the folder across the runs that use it (a SLURM requeue, a rerun into a fixed
hydra.run.dir): one run at a time, with the same configuration.

Training, evaluation, generation, the report and the sweep's callbacks all take their paths from here.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import socket
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import write_text
from .errors import ConfigError
from .formats import refuse_unsafe_pickle
from .sweeps import flatten


class RunFolderRefused(ConfigError):
    """The run folder belongs to another run (it holds it, or its checkpoint is another configuration's):
    this run writes nothing there."""


class RunFolderInUse(RunFolderRefused):
    """Another run holds the run folder."""


log = logging.getLogger(__name__)
LOCK_FILE = ".conceptlab.lock"
# What atomic_path leaves when a process dies between writing and renaming.
STRAY_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
# The settings that make a checkpoint what it is; the others say how long or how to watch a run.
IDENTITY = ("method.", "data.", "model.", "optim.", "seed", "concept")


STEP_FOLDER = re.compile(r"^step_(\d+)$")
HYDRA_CONFIG, HYDRA_OVERRIDES = ".hydra/config.yaml", ".hydra/overrides.yaml"  # what Hydra saves in a run


@dataclass(frozen=True)
class RunFolder:
    """Every path of one run's folder (the layout, written once)."""

    root: Path

    @property
    def record(self) -> Path:
        """summary.json: the run's own record (records.RunRecord)."""
        return self.root / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.ckpt"

    @property
    def concepts(self) -> Path:
        """The learned concept files at the end of the run."""
        return self.root / "concepts"

    @property
    def steps(self) -> Path:
        """The concept kept at each evaluation step: steps/step_NNNNNN/."""
        return self.concepts / "steps"

    def step(self, step: int) -> Path:
        return self.steps / f"step_{step:06d}"

    def kept_steps(self) -> list[int]:
        """The steps whose concept the run kept, in order."""
        if not self.steps.is_dir():
            return []
        found = (STEP_FOLDER.match(p.name) for p in self.steps.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    @property
    def samples(self) -> Path:
        """Sample grids: samples/step_NNNNNN.png."""
        return self.root / "samples"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step_{step:06d}.png"

    def sample_grids(self) -> list[Path]:
        """The run's sample grids, in step order."""
        return sorted(self.samples.glob("step_*.png"))

    @property
    def eval(self) -> Path:
        """evaluate.py's results for this run: eval.json, images/, grids."""
        return self.root / "eval"

    @property
    def eval_record(self) -> Path:
        return self.eval / "eval.json"

    @property
    def study(self) -> Path:
        """An application study's own files (its before/after grids)."""
        return self.root / "study"

    @property
    def metrics(self) -> Path:
        """metrics.csv, kept across the runs of the folder (loggers.HistoryCSVLogger)."""
        return self.root / "metrics.csv"

    @property
    def hydra_config(self) -> Path:
        """The composed config Hydra saved for the run."""
        return self.root / HYDRA_CONFIG

    @property
    def overrides(self) -> Path:
        """The command line's overrides, as Hydra saved them."""
        return self.root / HYDRA_OVERRIDES

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def reserve(self) -> Path:
        """Space kept on the disk for the record's last write (records.RunRecord): a disk that fills
        during training still takes the record that says so."""
        return self.root / ".conceptlab.reserve"

    def composed_config(self) -> DictConfig:
        """The config train.py composed for the run (Hydra's .hydra/config.yaml)."""
        if not self.hydra_config.is_file():
            raise ConfigError(f"{self.root}: no .hydra/config.yaml there; give a run directory train.py made")
        return OmegaConf.load(self.hydra_config)

    def write_hydra_record(self, task: DictConfig, hydra: DictConfig) -> None:
        """Hydra's record of the run (.hydra/config.yaml, hydra.yaml, overrides.yaml), as Hydra writes it,
        written by the run itself once it holds the folder (train.yaml: hydra.output_subdir=null), so a
        run refused the folder never rewrites the record of the run that has it."""
        # Hydra's YAML of each, without first copying the configs into new ones (a packed sweep writes
        # sixteen of these in a row): hydra.yaml nests Hydra's settings under `hydra:`, indented as
        # YAML nests a mapping.
        write_text(self.hydra_config, OmegaConf.to_yaml(task))
        write_text(
            self.hydra_config.with_name("hydra.yaml"),
            "hydra:\n" + textwrap.indent(OmegaConf.to_yaml(hydra), "  "),
        )
        write_text(self.overrides, OmegaConf.to_yaml(OmegaConf.create(list(hydra.overrides.task))))

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder (as the record names files), or as it is if outside."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def read_record(self) -> dict[str, Any]:
        """summary.json as a dict; a one-line error if it cannot be read."""
        try:
            record = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"{self.root}: its summary.json is unreadable ({err})") from err
        if not isinstance(record, dict):
            raise ConfigError(f"{self.root}: its summary.json is not a JSON object")
        return record

    def concepts_at(self, which: str) -> tuple[Path, str]:
        """The folder of the concept the run kept at `which` (final | best | step=N), and its label."""
        if which == "final":
            return self.concepts, "final"
        if which == "best":
            try:
                best = self.read_record().get("best") or {}
            except ConfigError as err:
                raise ConfigError(f"{err}; use concept=step=N") from err
            if not best.get("concepts"):
                raise ConfigError(
                    f"{self.root}: its summary.json names no best step (the run evaluated no metrics during "
                    "training); use concept=final or concept=step=N"
                )
            return self.root / best["concepts"], f"best (step {best['step']}, {best['metric']})"
        match = re.fullmatch(r"step=(\d+)", which)
        if not match:
            raise ConfigError(f"concept={which!r}: use final, best or step=N")
        step = int(match.group(1))
        if not self.step(step).is_dir():
            kept = ", ".join(str(k) for k in self.kept_steps()) or "none"
            raise ConfigError(
                f"{self.root} kept no concept at step {step} (kept: {kept}; concepts are kept at each "
                "evaluation step)"
            )
        return self.step(step), which


def find_run_dirs(root: Path) -> list[Path]:
    """Every job directory (one with Hydra's .hydra/ record) below root, in job order."""
    dirs = {p.parent.parent for p in Path(root).glob(f"**/{HYDRA_CONFIG}")}
    return sorted(dirs, key=lambda d: (str(d.parent), _job_number(d), d.name))


def _job_number(run_dir: Path) -> int:
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this run; a second run started in it stops at once, naming the holder.

    A POSIX lock (works on NFS with a lock daemon, as clusters' shared file systems have it); the
    kernel releases it when the process dies, so a killed run never leaves the folder locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunFolder(run_dir).lock
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
    """`key: saved -> current` for every setting that makes a checkpoint what it is and differs. A key the
    saved configuration lacks is one a later version added (its default is what the run did): no difference."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in old if k.startswith(IDENTITY))
    return [
        f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys if old.get(k) != new.get(k)
    ]


def check_checkpoint_safe(checkpoint: Path) -> None:
    """A checkpoint to continue from holds nothing but tensors and plain containers."""
    refuse_unsafe_pickle(checkpoint, "continue from a checkpoint conceptlab wrote", ConfigError)


def check_same_configuration(checkpoint: Path, config: dict[str, Any], run_dir: Path) -> None:
    """A run folder's own checkpoint continues only the configuration that wrote it."""
    check_checkpoint_safe(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("conceptlab", {}).get("config")
    if not saved:
        return
    differences = identity_differences(saved, config)
    if differences:
        shown = "; ".join(differences[:4]) + (
            f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
        )
        raise RunFolderRefused(
            f"run folder {run_dir} holds the checkpoint of another configuration ({shown}): give this run "
            f"another folder, or delete {checkpoint.parent} to start this folder over"
        )
