"""What a person reads on the console: other libraries' noise filtered at its source, a progress bar in
steps, and short lines at the start and the end of a run.

NOISE is the one list of messages from other libraries that are hidden, each with the reason it is
safe to hide: they ask nothing of the user. Everything else - real warnings, and all of conceptlab's
own - still shows, and `hydra.verbose=true` brings everything back. (W&B's warning about the
`anonymous` setting is not filtered: loggers.py stops passing that dead setting.)
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities import rank_zero_only
from tqdm.auto import tqdm

from .smoothing import RunningEMA

# diffusers and transformers load inside the functions that use them, not here: importing them costs diffusers ~5 s, transformers ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.


@dataclass(frozen=True)
class Noise:
    source: str  # "warning" (Python warnings, matched with the module) or "log" (a logger's records)
    where: str  # the warning's module regex, or the logger's name
    message: str  # regex the message starts with
    reason: str  # why hiding it is safe


NOISE = (
    Noise("log", "pytorch_lightning.utilities.rank_zero", r"(GPU|TPU|HPU) available",
          "Lightning's hardware inventory; the start line names the device and precision conceptlab uses"),
    Noise("log", "pytorch_lightning.utilities.rank_zero", r"💡 Tip",
          "an advertisement for another logging product"),
    Noise("log", "pytorch_lightning.utilities.rank_zero", r"`Trainer.fit` stopped: `max_steps=",
          "every run stops at trainer.max_steps by design; the end summary says how it ended"),
    Noise("warning", r"lightning_fabric\.plugins\.environments\.slurm", r"The `srun` command is available on your system",
          "SLURM is present but the run was started directly: deliberate (local runs, the one-machine cluster)"),
    Noise("log", "pytorch_lightning.utilities.rank_zero", r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
          "device bookkeeping Lightning prints per rank"),
    Noise("warning", r"pytorch_lightning\.utilities\._pytree", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
          "a deprecation inside Lightning's own code, not in conceptlab's calls"),
    Noise("log", "transformers", r"`\w+ImageProcessor` requires torchvision",
          "image processors conceptlab never uses fall back to PIL; nothing to install"),
    Noise("log", "transformers", r"The new embeddings will be initialized from a multivariate normal",
          "textual inversion overwrites the new rows with its own vectors right after resizing"),
)  # fmt: skip


class _DropNoise(logging.Filter):
    """Drops a record whose logger is (below) a NOISE logger and whose message matches its pattern."""

    def __init__(self, patterns: list[tuple[str, re.Pattern]]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            (record.name == name or record.name.startswith(name + ".")) and pattern.match(message)
            for name, pattern in self.patterns
        )


_DROP = _DropNoise([(n.where, re.compile(n.message)) for n in NOISE if n.source == "log"])


def quiet_third_party(verbose: bool = False) -> None:
    """Hide the NOISE messages; with `verbose`, hide nothing. Called at the start of every job (Hydra
    sets up the root logger's handlers anew for each)."""
    if verbose:
        return
    try:  # progress bars of loading weights: no question for the user, and they interleave with ours
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        transformers_logging.get_logger("transformers")  # sets up its handler, which gets a filter below
    except ImportError:
        pass
    for noise in NOISE:
        if noise.source == "warning":
            warnings.filterwarnings("ignore", message=noise.message, module=noise.where)
    # A logger's own filters see only its own records; handlers' filters see the records of every
    # logger below too: the NOISE loggers' own handlers (transformers logs through module loggers
    # into the handler of "transformers") and the root's (where records propagate, e.g. under CI=true).
    targets = [logging.getLogger(n.where) for n in NOISE if n.source == "log"]
    targets += [h for logger in [*targets, logging.getLogger()] for h in logger.handlers]
    for target in dict.fromkeys(targets):
        if _DROP not in target.filters:
            target.addFilter(_DROP)


def is_verbose() -> bool:
    """Hydra's `hydra.verbose` (true or a list of loggers) asks for everything."""

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def say(line: str) -> None:
    """A conceptlab line on the console (stdout), from rank zero only; a progress bar on the screen is
    cleared first and drawn again below the line (no line is ever written into a bar)."""

    if rank_zero_only.rank == 0:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


@contextmanager
def logging_around_bars() -> Iterator[None]:
    """While it lasts, a log record written to the console clears the progress bars on the screen first
    and draws them again below it (tqdm's external write mode): no record lands inside a bar's line."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]  # fmt: skip
    for handler in handlers:

        def emit(record: logging.LogRecord, write=handler.emit) -> None:
            with tqdm.external_write_mode():
                write(record)

        handler.emit = emit  # this handler's own: the class's method is untouched
    try:
        yield
    finally:
        for handler in handlers:
            handler.__dict__.pop("emit", None)


def bar_text(trainer: pl.Trainer, text: str) -> str | None:
    """`text` for a transient progress bar (sampling, judging) where the run shows its progress, else None:
    a job of a packed sweep draws none, the pack's one bar speaks for all its jobs."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return text if bar is not None and bar.is_enabled else None


class StepProgress(ProgressBar):
    """One bar in optimizer steps of trainer.max_steps: rate, ETA, the loss and the last evaluation's
    headline scores (read from the run record)."""

    def __init__(self, record=None, enabled: bool = True, stats=None):
        super().__init__()
        self.record = record
        self.stats = stats  # callbacks.RunStats: its per-step losses feed the bar's smoothed loss
        self.loss = RunningEMA()
        self.seen = 0
        self._enabled = enabled  # off for a packed sweep's jobs: the pack draws one bar for them all
        self.bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.is_enabled and trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="training", unit="step",
                            dynamic_ncols=True, file=sys.stderr)  # fmt: skip
            self._postfix(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        # The loss is read back from the device only when the bar redraws anyway.
        if self.bar.n == self.bar.total or self.bar.n - getattr(self, "_shown", -10) >= 10:
            self._postfix(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.bar is not None:
            self._postfix(trainer)
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, module, exception) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _postfix(self, trainer: pl.Trainer) -> None:
        self._shown = self.bar.n
        parts = []
        if self.stats is not None and len(self.stats.losses) > self.seen:  # the steps since the last redraw
            self.loss.update(torch.stack(self.stats.losses[self.seen :]).float().cpu().tolist())
            self.seen = len(self.stats.losses)
        if self.loss.value is not None:
            parts.append(f"loss (EMA) {self.loss.value:.4f}")
        scores = self.record.summary.metrics if self.record is not None else {}
        headline = self.record.summary.headline if self.record is not None else ()
        parts += [f"{k} {scores[k]:.2f}" for k in headline if isinstance(scores.get(k), float | int)]
        self.bar.set_postfix_str(" · ".join(parts), refresh=False)
