"""Hydra callbacks: checks before a sweep launches anything, and the table at its end."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CheckLauncher(Callback):
    """`hydra/launcher=slurm` without SLURM's sbatch is one line and exit status 2, not a hang."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if "Slurm" in target and shutil.which("sbatch") is None:
            print(
                "error: hydra/launcher=slurm needs SLURM's sbatch on PATH (run on a cluster's login node, or "
                "start a one-machine cluster with scripts/slurm/start.sh); drop hydra/launcher=slurm to run locally",
                file=sys.stderr,
            )
            sys.exit(2)


class SweepSummary(Callback):
    """At a sweep's end: the table of its jobs (status and the study's metric) and the report command.

    The local launcher runs the jobs in this process: the table follows the last job, so a sweep with
    a failed job (which Hydra then reports as an error) shows it too. Other launchers (SLURM) wait for
    their jobs and end the sweep here.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or "BasicLauncher" not in str(
            config.hydra.launcher._target_
        ):
            return
        from .report import expected_job_count

        sweep_dir = Path(config.hydra.sweep.dir)
        if config.hydra.job.num + 1 >= (expected_job_count(sweep_dir) or 0):
            print_sweep_table(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if "BasicLauncher" not in str(config.hydra.launcher.get("_target_", "")):
            print_sweep_table(Path(config.hydra.sweep.dir))


def print_sweep_table(sweep_dir: Path) -> None:
    from .errors import ConceptLabError
    from .report import collect, headline

    try:
        sweep = collect(sweep_dir)
    except ConceptLabError:
        return
    answer = headline(sweep)
    metric = answer.metric if answer else "final_loss"
    lines = [f"sweep: {len(sweep.runs)} jobs in {sweep_dir}"]
    for _, row in sweep.runs.iterrows():
        value = row.get(metric)
        shown = f"{metric} {value:.4g}" if isinstance(value, float) and value == value else ""
        name = row.get("run_name") if isinstance(row.get("run_name"), str) else ""
        lines.append(f"  {str(row['run_dir']):<28} {str(row['status']):<12} {name:<32} {shown}")
    lines.append(
        f"report: conceptlab-report {sweep_dir}   (the same as python scripts/report.py in a checkout)"
    )
    print("\n".join(lines), flush=True)
