"""Experiment loggers: metrics.csv always; Weights & Biases when configured, never blocking a run."""

from __future__ import annotations

import csv
import logging
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from .atomic import write_text
from .config import LoggerConfig
from .runfolder import RunFolder
from .sweeps import flatten
from .wandbmode import wandb_mode

# wandb load inside the functions that use them, not here: importing them costs wandb ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)


def make_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any],
                 group: str | None = None, job_type: str | None = None, tags: list[str] | None = None,
                 in_pack: bool = False, evidence: list[str] | None = None) -> list[Logger]:  # fmt: skip
    """metrics.csv in the run directory (keeping earlier runs' rows), plus a WandbLogger if `cfg.wandb`.

    in_pack: the job shares its process (and W&B's service) with the other jobs of a packed sweep.
    evidence: the metrics that say what the run learned; W&B's summary keeps their best and last value."""
    loggers: list[Logger] = [HistoryCSVLogger(run_dir)]
    if cfg.wandb:
        logger = make_wandb_logger(cfg, run_dir, run_name, config, group, job_type, tags or [], in_pack)
        define_summaries(logger.experiment, evidence or [])
        loggers.append(logger)
    return loggers


def define_summaries(run: Any, evidence: list[str]) -> None:
    """W&B's summary of a run holds the best and the last value of what says what it learned (and the
    loss's lowest and last), each against the optimizer step (Lightning's `trainer/global_step`)."""
    for metric in evidence:
        run.define_metric(metric, step_metric="trainer/global_step", summary="max,last")
    run.define_metric("train/loss", step_metric="trainer/global_step", summary="min,last")


def log_sweep_table(cfg: LoggerConfig, group: str | None, sweep_dir: Path, table: Any, title: str) -> None:
    """The sweep's answer (the report's headline table, a DataFrame) as a W&B Table in the sweep's group,
    in a run of its own (job type `sweep`). Never fails the sweep: a W&B problem is one warning."""
    import wandb

    try:
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        if mode == "offline":
            no_wandb_analytics()
        run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, job_type="sweep",
            name=f"{group or 'sweep'}: {title}", dir=str(sweep_dir), mode=mode, reinit="create_new",
            settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True),
        )  # fmt: skip
        run.log({"sweep/answer": wandb.Table(dataframe=table.astype(str))})
        run.finish()
    except Exception as err:  # noqa: BLE001 - W&B raises many kinds; none may fail a sweep that trained
        log.warning(
            "W&B: the sweep's table was not logged (%s)", str(err).splitlines()[0] if str(err) else err
        )


def make_wandb_logger(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any],
                      group: str | None, job_type: str | None, tags: list[str], in_pack: bool = False) -> Logger:  # fmt: skip
    """A started WandbLogger; if the server cannot be reached in time the run goes on offline.

    The config is logged flattened ("method.lr") so dashboards filter and group by every key.
    """
    import wandb

    mode = wandb_mode(cfg)
    # A requeued or resumed job continues its W&B run: the id is kept in the run directory.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]

    def start(mode: str, run_id: str) -> WandbLogger:
        if mode == "offline":
            no_wandb_analytics()
        logger = WandbLogger(
            id=run_id,
            resume="allow",
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            group=group,
            job_type=job_type,
            tags=[*cfg.tags, *tags],
            save_dir=str(run_dir),
            mode=mode,
            config=flatten(config),
            settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True),
            # A run of its own, never the process's current one: the jobs of a packed sweep run side by
            # side in one process, each with its W&B run (finished by train.finish_wandb).
            reinit="create_new",
        )
        # Lightning always passes W&B's deprecated `anonymous` setting (None), which makes W&B warn on
        # every run; the setting does nothing, so it is not passed (console.py lists what is hidden).
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        logger.experiment  # noqa: B018 - start the run now, where a failure can still be handled

        if rank_zero_only.rank == 0 and not id_file.is_file():
            write_text(id_file, run_id)
        return logger

    if mode == "online":
        # Asked first, within logger.init_timeout: a server that accepts connections and never answers
        # would otherwise hold W&B's start past its own timeout, and its service at exit.
        url = os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL
        silence = unanswered(url, cfg.init_timeout)
        if silence is not None:
            log.warning("W&B: could not reach the server at %s within %g s (%s); logging offline, sync later with "
                        "`wandb sync %s`", url, cfg.init_timeout, silence, run_dir / "wandb")  # fmt: skip
            return start("offline", run_id)
        try:
            return start(mode, run_id)
        # W&B raises many kinds of errors for an unreachable or refusing server; any of them means
        # "log offline instead", never "fail the run".
        except Exception as err:  # noqa: BLE001
            reason = str(err).splitlines()[0]
            # The failed start still holds its run id in W&B's service (a second start with it is refused
            # as "in use"): the offline run gets a fresh id, recorded for requeues and `wandb sync`.
            fresh = uuid.uuid4().hex[:8]
            log.warning("W&B: could not reach the server (%s); logging offline as run %s, sync later with "
                        "`wandb sync %s`", reason, fresh, run_dir / "wandb")  # fmt: skip
            if id_file.is_file():
                id_file.unlink()
            # Stop W&B's service, which would otherwise keep retrying the dead server until the process exits
            # (not in a packed sweep: the other jobs' runs live in that service too).
            if not in_pack:
                wandb.teardown()
            return start("offline", fresh)
    return start(mode, run_id)


DEFAULT_WANDB_URL = "https://api.wandb.ai"


def no_wandb_analytics() -> None:
    """W&B's own usage analytics for the process, off. They post to the W&B server even when every run is
    offline, and at exit wait up to 10 s on a server that never answers (wandb 0.31's OpenTelemetry
    proxy); an offline run sends nothing."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):  # another wandb version: nothing of the kind to turn off
        pass


def unanswered(url: str, timeout: float) -> str | None:
    """Why the server at `url` gave no HTTP answer within `timeout` seconds, or None if it answered (an
    error status is an answer: the server is there)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # noqa: S310 - the W&B server the user named
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:  # refused, no DNS, timed out, a bad URL
        return str(getattr(err, "reason", None) or err) or type(err).__name__
    return None


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
        current = RunFolder(run_dir).metrics
        previous = current.with_name("metrics.csv.previous")
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
