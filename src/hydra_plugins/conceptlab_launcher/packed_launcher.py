"""conceptlab's packed launcher for Hydra (`hydra/launcher=packed`; the work is in conceptlab.packing).

Hydra imports every module of the hydra_plugins package when it starts: this one imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher

from conceptlab.errors import ConfigError


class PackedLauncher(Launcher):
    """The sweep's jobs in this process; those that can share a pass train together in packs."""

    def __init__(self, pack_size: int = 16) -> None:
        if isinstance(pack_size, bool) or not isinstance(pack_size, int) or pack_size < 1:
            raise ConfigError(
                f"hydra.launcher.pack_size={pack_size}: give a whole number of jobs, at least 1"
            )
        self.pack_size = pack_size
        self.config: Any = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from conceptlab.packing import launch_packed  # Lightning and torch: only when a sweep launches

        return launch_packed(self, job_overrides, initial_job_idx)
