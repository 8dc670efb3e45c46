"""The run's own record: summary.json, written at start, on success and on failure (atomically)."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import write_json

PACKAGES = ("conceptlab", "torch", "diffusers", "transformers", "pytorch-lightning", "hydra-core", "wandb")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RunRecord:
    """Accumulates what a run is and did, and rewrites summary.json whole each time it changes."""

    def __init__(self, run_dir: Path, **fields: Any):
        self.path = run_dir / "summary.json"
        self.run_dir = run_dir
        self.started = time.time()
        self.data: dict[str, Any] = {
            "status": "running",
            "error": None,
            **fields,
            "run_dir": str(run_dir),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "versions": package_versions(),
        }
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self.data["status"] = status
        if error is not None:
            self.data["error"] = f"{type(error).__name__}: {error}"
        self.data["wall_time_s"] = round(time.time() - self.started, 3)
        self.write()

    def write(self) -> None:
        from pytorch_lightning.utilities import rank_zero_only

        if rank_zero_only.rank == 0:  # one record per run, however many processes train it
            write_json(self.path, self.data)

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)
