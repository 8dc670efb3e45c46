"""Hydra callbacks: checks before a sweep launches anything, and the table at its end."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import call
from omegaconf import DictConfig, OmegaConf

from .errors import ConceptLabError, error_line
from .sweeps import TRAINING_LOSS, is_search, search_problem, wandb_group
from .wandbmode import wandb_mode

# The report (pandas, matplotlib, torch) loads when a sweep ends, not here: Hydra builds these callbacks
# at the start of every run, and importing the report there cost ~1.1 s more (3.6 s instead of 2.5 s
# for a module that conceptlab.cli already pays torch for; measured on the 2-core CI machine).


class CheckOutputRoot(Callback):
    """`output_root=` a file, or a folder nobody may write: one line and exit status 2 before Hydra makes
    the run's folder below it (Hydra would stop with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)

    @staticmethod
    def check(config: DictConfig) -> None:
        root = config.get("output_root")
        if root is None:
            return
        path = Path(str(root)).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        problem = None
        if existing is not None and not existing.is_dir():
            problem = f"{existing} is a file, not a folder: give a folder (it is made if missing)"
        elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable here: give a folder you can write in"
        if problem:
            print(f"error: output_root={root}: {problem}", file=sys.stderr)
            sys.exit(2)


class CheckLauncher(Callback):
    """`hydra/launcher=slurm` without SLURM's sbatch is one line and exit status 2, not a hang."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        decide_wandb_mode(config)
        search_check(config)
        target = str(config.hydra.launcher.get("_target_", ""))
        if "Slurm" in target and shutil.which("sbatch") is None:
            print(
                "error: hydra/launcher=slurm needs SLURM's sbatch on PATH (run on a cluster's login node, or "
                "start a one-machine cluster with scripts/slurm/start.sh); drop hydra/launcher=slurm to run locally",
                file=sys.stderr,
            )
            sys.exit(2)
        if "Slurm" in target:
            problem = slurm_request_problem(config.hydra.launcher, read_sinfo())
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                sys.exit(2)


@dataclass
class Node:
    """What `sinfo -N` says of one node in one partition."""

    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    time_limit_min: float  # inf: no limit
    default: bool = False


def read_sinfo() -> list[Node] | None:
    """The cluster's nodes, or None when sinfo cannot say (the check is then skipped, not guessed)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        partition, cpus, memory, gres, limit = parts
        try:
            gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            nodes.append(Node(partition.rstrip("*"), int(cpus), int(memory.rstrip("+")), gpus,
                              slurm_minutes(limit), partition.endswith("*")))  # fmt: skip
        except ValueError:
            continue
    return nodes or None


def slurm_minutes(limit: str) -> float:
    """SLURM's time format ("infinite", "D-HH:MM:SS", "HH:MM:SS", "MM:SS", "MM") in minutes."""
    if limit.strip().lower() in ("infinite", "unlimited", "n/a"):
        return math.inf
    days, _, clock = limit.rpartition("-")
    fields = [int(f) for f in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = fields + [0] * (3 - len(fields))
    else:  # minutes, minutes:seconds, hours:minutes:seconds
        hours, minutes, seconds = {1: [0, *fields, 0], 2: [0, *fields], 3: fields}[len(fields)]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def slurm_request_problem(launcher: Any, nodes: list[Node] | None) -> str | None:
    """Why no node of the cluster could ever run a job of this sweep (the key to change), or None."""
    if not nodes:
        return None
    partition = launcher.get("partition")
    if partition:
        candidates = [n for n in nodes if n.partition == partition]
        if not candidates:
            known = ", ".join(sorted({n.partition for n in nodes}))
            return (
                f"hydra.launcher.partition={partition}: the cluster has no such partition (it has: {known})"
            )
    else:
        candidates = [n for n in nodes if n.default] or nodes
        partition = candidates[0].partition
    tasks = int(launcher.get("tasks_per_node") or 1)
    asks = [
        ("cpus_per_task", launcher.get("cpus_per_task"), tasks, lambda n: n.cpus, "CPUs"),
        ("mem_gb", launcher.get("mem_gb"), 1, lambda n: n.memory_mb / 1024, "GB of memory"),
        ("gpus_per_node", launcher.get("gpus_per_node"), 1, lambda n: n.gpus, "GPUs"),
        ("timeout_min", launcher.get("timeout_min"), 1, lambda n: n.time_limit_min, "minutes"),
    ]
    for key, value, per_node, has, what in asks:
        if value is None:
            continue
        largest = max(has(n) for n in candidates)
        if float(value) * per_node > largest:
            times = f" x {per_node} tasks a node" if per_node > 1 else ""
            fix = int(largest // per_node) if math.isfinite(largest) else largest
            return (
                f"hydra.launcher.{key}={value}{times} asks for more {what} than any node of partition "
                f"{partition} has ({largest:g}): no job could ever start; set hydra.launcher.{key}={fix}"
                + (" (and trainer.accelerator=cpu)" if key == "gpus_per_node" and largest == 0 else "")
            )
    return None


class SweepSummary(Callback):
    """At a sweep's end: the study's sweep-wide step (`study.at_end`: composition), the table of its
    jobs (status and the study's metric) and the report command.

    The local launcher runs the jobs in this process: the table follows the last job. The packed
    launcher ends its sweep itself (end_sweep). Other launchers (SLURM) wait for their jobs and end the
    sweep here. A sweep with a job that did not complete exits with status 1 at its end.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra's basic sweeper records the sweep's command line in multirun.yaml (the swept keys, the job
        # count and the report read it); a search (hydra/sweeper=optuna) does not: the same record here.
        record = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if not record.exists():
            record.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, record)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or launcher_kind(config) != "local":
            return
        from . import report  # deferred: see the note at the imports

        sweep_dir = Path(config.hydra.sweep.dir)
        if config.hydra.job.num + 1 >= (report.expected_job_count(sweep_dir) or 0):
            end_sweep(config, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from . import report  # deferred: see the note at the imports

        sweep_dir = Path(config.hydra.sweep.dir)
        if launcher_kind(config) == "other":
            end_sweep(config, sweep_dir)
        # A job that failed said why in one line and in its record; the sweep as a whole did not succeed.
        try:
            runs = report.collect(sweep_dir).runs
        except ConceptLabError:
            return
        failed = [str(r["run_dir"]) for _, r in runs.iterrows() if r.get("status") != "completed"]
        if failed:
            print(f"sweep: {len(failed)} of {len(runs)} jobs did not complete ({', '.join(failed)}): "
                  "their records (summary.json) and lines above say why", file=sys.stderr)  # fmt: skip
            sys.exit(1)


def search_check(config: DictConfig) -> None:
    """A search (hydra/sweeper=optuna) that could not optimize its metric is one line and exit status 2
    before its first trial (each trial checks it too, with its evaluators' own evidence)."""
    if not is_search(config.hydra.sweeper):
        return
    study = config.get("study") or {}
    evaluated = bool(config.get("evaluators")) and bool(config.evaluate.enabled)
    metric = study.get("metric") or (None if evaluated else TRAINING_LOSS)
    if metric is None:  # the evaluators' own evidence: known once a trial builds them
        return
    problem = search_problem(metric, study.get("goal"), config.hydra.sweeper.get("direction"), evaluated)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def launcher_kind(config: DictConfig) -> str:
    """local (Hydra's basic launcher), packed (conceptlab's: it ends its sweep itself), or other."""
    target = str(config.hydra.launcher.get("_target_", ""))
    return "local" if "BasicLauncher" in target else "packed" if "PackedLauncher" in target else "other"


def decide_wandb_mode(config: DictConfig) -> None:
    """A sweep that logs to W&B with logger.mode=auto decides the mode once, at its start, for all its jobs
    (WANDB_MODE, which they and the jobs a cluster starts from this environment read): W&B's notices are
    said once per sweep, not once per job. A bad logger.mode is one line and exit status 2."""
    logger = config.get("logger") or {}
    if not logger.get("wandb") or logger.get("mode") != "auto" or os.environ.get("WANDB_MODE"):
        return
    try:
        os.environ["WANDB_MODE"] = wandb_mode(logger)
    except ConceptLabError as err:
        print(error_line(err), file=sys.stderr)
        sys.exit(2)


def end_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """The study's sweep-wide step, then the table of the sweep's jobs (to the console, and to W&B in the
    sweep's group when the jobs log there)."""
    finish_study(config, sweep_dir)
    answer = print_sweep_table(sweep_dir)
    if answer is not None and config.get("logger", {}).get("wandb"):
        from .loggers import log_sweep_table  # deferred, as the report is: Lightning and W&B load here

        group = wandb_group(config.logger.group, config.study.name, sweep_dir)
        log_sweep_table(config.logger, group, sweep_dir, answer.table, f"best by {answer.metric}")


def finish_study(config: DictConfig, sweep_dir: Path) -> None:
    """The study's step over the whole sweep (`study.at_end`, e.g. composition's pairs of runs)."""
    step = config.get("study", {}).get("at_end")
    if not step:
        return

    print(f"{config.study.name or 'study'}: {step._target_} over {sweep_dir} ...", flush=True)
    try:
        result = call(step, sweep_dir=sweep_dir, settings=config.evaluate)
    except (ConceptLabError, OSError, KeyError) as err:  # the runs' own records stay as they are
        print(f"the study's last step failed: {error_line(err)}", flush=True)
        return
    if result is not None:
        print(f"{config.study.name or 'study'}: {result}", flush=True)


def print_sweep_table(sweep_dir: Path):
    """The table of the sweep's jobs and its answer, on the console; returns the answer (report.Headline)."""
    from . import report  # deferred: see the note at the imports

    try:
        sweep = report.collect(sweep_dir)
    except ConceptLabError:
        return None
    answer = report.headline(sweep)
    metric = answer.metric if answer else "final_loss"
    lines = [f"sweep: {len(sweep.runs)} jobs in {sweep_dir}"]
    for _, row in sweep.runs.iterrows():
        value = row.get(metric)
        shown = f"{metric} {value:.4g}" if isinstance(value, float) and value == value else ""
        name = row.get("run_name") if isinstance(row.get("run_name"), str) else ""
        lines.append(f"  {str(row['run_dir']):<28} {str(row['status']):<12} {name:<32} {shown}")
    if answer is not None:
        lines.append(report.best_line(answer))
    lines.append(
        f"report: conceptlab-report {sweep_dir}   (the same as python scripts/report.py in a checkout)"
    )
    print("\n".join(lines), flush=True)
    return answer
