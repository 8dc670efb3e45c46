"""The run's own record: one typed summary, owned by one object, written to summary.json (atomically)
at start, on success and on failure.

Every part of a run reports to the RunRecord. Parts that run inside Lightning's training processes
(speed, evaluation scores) report through `RunRecord.report`, which also leaves the fields in the
trainer's callback metrics: that is how Lightning returns results from `ddp_spawn` workers to the
process that writes the record, so no side files are needed.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from .atomic import write_json
from .runfolder import RunFolder

# Kept for the record's last write (a record is a few KB; this keeps several times that).
RESERVED_BYTES = 64 * 1024

PACKAGES = (
    "conceptlab",
    "torch",
    "diffusers",
    "transformers",
    "pytorch-lightning",
    "hydra-core",
    "wandb",
    "peft",
)
REPORT_KEY = "conceptlab/record"


def package_versions() -> dict[str, str | None]:
    """The versions of Python and of the packages a result depends on (read once per process)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunSummary:
    """What summary.json holds: what the run is, how it was set up, what it did."""

    # identity (at start)
    status: str = "running"  # running | completed | failed | interrupted
    error: str | None = None
    method: str = ""
    concept: str = ""
    model: str = ""
    overrides: list[str] = field(default_factory=list)
    swept: dict[str, str] = field(default_factory=dict)
    study: str | None = None
    sweep_dir: str | None = None
    seed: int = 0
    max_steps: int = 0
    run_dir: str = ""
    started_at: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    run_name: str | None = None
    # set-up (before the first step)
    global_batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    trainable_params: int | None = None
    num_images: int | None = None
    images: list[str] = field(default_factory=list)
    held_out_images: list[str] = field(default_factory=list)  # data.val_images: measured, never trained on
    # concepts trained in the same run (Method.joint_sets): {"words", "path", "images"} each
    joint: list[dict[str, Any]] = field(default_factory=list)
    resolution: int | None = None
    buckets: dict[str, int] | None = None  # data.buckets: images per size "WxH" (None: off, all squares)
    resumed_from: str | None = None
    snr_gamma: float | None = None  # optim.snr_gamma: min-SNR-γ loss weighting (None: off)
    ema_decay: float | None = None  # ema.decay: files, samples and scores are of the average (None: off)
    masked_images: int | None = None  # data.mask: how many images had a mask (None: data.mask off)
    noise_offset: float | None = None  # optim.noise_offset (None: off)
    # training (reported by RunStats)
    steps: int | None = None
    final_loss: float | None = None
    smoothed_loss: float | None = None  # the loss as the console shows it: its EMA (smoothing.py)
    mean_loss: float | None = None
    train_time_s: float | None = None
    steps_this_process: int | None = None
    steps_per_s: float | None = None
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    time_to_first_step_s: float | None = None
    # evaluation: the evaluators' last scores ("judge/concept", ...) and the step they are from, the
    # first scores of this process (usually step 0: "before"), and the keys worth a headline
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_at_start: dict[str, float] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)
    # the metrics that say what the run learned, each evaluator's `evidence` in the config's order
    # (sweeps.evidence_order: how the report and the best step choose among them)
    evidence: list[str] = field(default_factory=list)
    # the best evaluation step by evaluate.best: {metric, value, step, concepts (its folder)}
    best: dict[str, Any] = field(default_factory=dict)
    example_prompt: str | None = None  # a prompt that uses the learned concept (generate.py)
    # the end
    files: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None


def publish(trainer: pl.Trainer, record: RunRecord | None, step: int, metrics: dict[str, float]) -> None:
    """An evaluator's metrics at `step`: to every logger (metrics.csv, W&B) and to the run record."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    if record is not None:
        record.report(trainer, metrics={"step": step, **metrics})


class RunRecord(pl.Callback):
    """Accumulates the RunSummary and rewrites summary.json whole each time it is written."""

    def __init__(self, run_dir: Path, **fields: Any):
        self.path = RunFolder(run_dir).record
        self.run_dir = run_dir
        self.started = time.time()
        self.summary = RunSummary(
            run_dir=str(run_dir),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            versions=package_versions(),
        )
        self.update(**fields)
        self.write()
        self.keep_space()

    @property
    def data(self) -> dict[str, Any]:
        return dataclasses.asdict(self.summary)

    def update(self, **fields: Any) -> None:
        for name, value in fields.items():
            if not hasattr(self.summary, name):
                raise AttributeError(
                    f"RunSummary has no field {name!r}"
                )  # a typo in the code, not the user's
            setattr(self.summary, name, value)

    def report(self, trainer: pl.Trainer, **fields: Any) -> None:
        """Fields from inside training; they reach the record in whichever process writes it."""
        if "metrics" in fields:  # several evaluators report: their metrics merge
            new, start = fields["metrics"], self.summary.metrics_at_start
            if not start or start.get("step") == new.get("step"):
                fields["metrics_at_start"] = {**start, **new}
            fields["metrics"] = {**self.summary.metrics, **new}
        self.update(**fields)
        trainer.callback_metrics.setdefault(REPORT_KEY, {}).update(fields)

    def collect(self, trainer: pl.Trainer) -> None:
        """Take up what the training processes reported (after trainer.fit)."""
        self.update(**trainer.callback_metrics.get(REPORT_KEY, {}))

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """The record's last write. Its kept space is freed first, so it goes through on a disk that
        filled during training; if it still cannot be written, the console says which run ended how."""
        self.summary.status = status
        if error is not None:
            self.summary.error = f"{type(error).__name__}: {error}"
        self.summary.wall_time_s = round(time.time() - self.started, 3)
        RunFolder(self.run_dir).reserve.unlink(missing_ok=True)
        try:
            self.write()
        except OSError as failed:
            ended = f"{status}: {self.summary.error}" if error is not None else status
            print(
                f"error: the run in {self.run_dir} {ended}; its record {self.path} could not be written "
                f"({failed.strerror or failed})",
                file=sys.stderr,
                flush=True,
            )
            if error is None:
                raise  # a run that completed but has no record has not completed

    def keep_space(self) -> None:
        """Set aside space for the last write of the record (removed when the run ends)."""
        if rank_zero_only.rank == 0:
            try:
                RunFolder(self.run_dir).reserve.write_bytes(b"\0" * RESERVED_BYTES)
            except OSError:
                pass  # a disk already too full for it: the run's own writes will say so

    def write(self) -> None:
        if rank_zero_only.rank == 0:  # one record per run, however many processes train it
            write_json(self.path, self.data)

    def relative(self, path: Path) -> str:
        return RunFolder(self.run_dir).relative(path)
