"""Hydra callbacks: checks that must happen before a sweep launches anything."""

from __future__ import annotations

import shutil
import sys
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
