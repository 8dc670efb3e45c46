"""conceptlab's packed launcher for Hydra (`hydra/launcher=packed`; the work is in conceptlab.packing).

Hydra imports every module of the hydra_plugins package when it starts: this one imports nothing heavy.
"""

from __future__ import annotations

import copy
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
        # The sweeper composes every job to check it (Sweeper.validate_batch_is_legal) through the loader
        # it shares with this launcher, which composes the same jobs again: each is composed once.
        if not isinstance(hydra_context.config_loader, ComposedOnce):
            hydra_context.config_loader = ComposedOnce(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from conceptlab.packing import launch_packed  # Lightning and torch: only when a sweep launches

        return launch_packed(self, job_overrides, initial_job_idx)


class ComposedOnce:
    """Hydra's config loader, keeping each job's configuration from the sweeper's check for the launch.

    `load_sweep_config` keeps what it composed for a job's overrides and hands it out once more (the
    launcher's load of the same job, which then owns it); everything else is the loader's own."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.kept: dict[tuple[int, tuple[str, ...]], Any] = {}

    def load_sweep_config(self, master_config: Any, sweep_overrides: list[str]) -> Any:
        key = (id(master_config), tuple(sweep_overrides))
        kept = self.kept.pop(key, None)
        if kept is not None:
            return kept
        self.kept[key] = composed = self.loader.load_sweep_config(master_config, list(sweep_overrides))
        return copy.deepcopy(composed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
