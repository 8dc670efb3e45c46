"""What a sweep varies: the swept keys of the current job and the names W&B shows for it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

# What stands in when no evaluator scored the runs. It compares nothing across methods (each trains other
# parameters, on its own noise draws), so wherever it stands in for the evidence, the page says so.
TRAINING_LOSS = "final_loss"
VAL_LOSS = "val/loss"  # data.val_images: the held-out images' loss on fixed draws (callbacks.HeldOutLoss)
LOSS_CAVEAT = (
    "No evaluator scored these runs, so the final training loss stands in; it does not compare methods "
    "(each trains other parameters on its own noise draws): train with evaluators=metrics, or run "
    "python evaluate.py sweep=<this folder>, for scores that do."
)


def evidence_order(evidence: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The metrics that say what runs learned, best evidence first: each evaluator's own (`evidence`, in
    the order the config lists the evaluators: a judge's ground truth before the similarity metrics),
    evaluate.py's full-protocol score before the same score during training, CLIP-I, then the held-out
    validation loss. The one rule wherever a best is chosen: the report's answer, the sweep's table, the
    best step of a run."""
    order: list[str] = []
    for metric in [*evidence, "metrics/clip_i"]:
        if metric.startswith("metrics/"):
            order.append("eval/" + metric.removeprefix("metrics/"))
        order.append(metric)
    # Then the held-out validation loss: the same images, timesteps and noise in every run, so it compares
    # runs where nothing scored samples (the training loss does not).
    return list(dict.fromkeys([*order, VAL_LOSS]))


def metric_goal(metric: str, goal: str | None = None) -> str:
    """max | min: `goal` (study.goal) where given, else min for a loss and max for any other metric."""
    return goal or ("min" if "loss" in metric else "max")


def is_search(sweeper: Any) -> bool:
    """Whether a sweep's `hydra.sweeper` is a search (Optuna's), whose trials return their metric."""
    return "optuna" in str(sweeper.get("_target_", "")).lower()


def search_problem(metric: str, goal: str | None, direction: Any, evaluated: bool) -> str | None:
    """Why a search (hydra/sweeper=optuna) could not optimize `metric`, or None: a metric other than the
    training loss needs evaluators during training, and `hydra.sweeper.direction` (an enum or a name)
    must say what the metric's goal says."""
    if metric != TRAINING_LOSS and not evaluated:
        return (
            f"study.metric={metric}: no evaluator scores these runs (evaluators=none, evaluate.enabled=false, or a "
            f"model without them), so the search has nothing to optimize; search study.metric={TRAINING_LOSS} or "
            "evaluate during training"
        )
    wanted = "maximize" if metric_goal(metric, goal) == "max" else "minimize"
    given = str(getattr(direction, "name", direction))
    if given == wanted:
        return None
    return (
        f"hydra.sweeper.direction={given}: the search's metric {metric} is better "
        f"{'higher' if wanted == 'maximize' else 'lower'} (study.goal={metric_goal(metric, goal)}); "
        f"set hydra.sweeper.direction={wanted}"
    )


def wandb_group(group: str | None, study: str | None, sweep_dir: str | Path | None) -> str | None:
    """The W&B group of a run: logger.group, else the study's name (or "sweep") and the sweep's id (its
    folder's name) for a sweep's jobs, else the study's name. The jobs of one sweep share it, and so does
    the table the sweep logs at its end."""
    if group:
        return group
    if sweep_dir:
        return f"{study or 'sweep'}-{Path(sweep_dir).name}"
    return study


def swept_keys(hydra_cfg: Any) -> list[str]:
    """Keys this multirun sweeps: the experiment's `hydra.sweeper.params` and comma/range overrides."""

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return []
    # As job_values names them: `+knob` (a config group the sweep adds) is the key `knob`.
    keys = [str(key).lstrip("+~") for key in (hydra_cfg.sweeper.get("params") or {})]
    # The job sees only its own values; the sweep's command line is in <sweep dir>/multirun.yaml.
    record = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if record.is_file():
        found = [key.lstrip("+~") for key in command_line_sweeps(str(record), record.stat().st_mtime_ns)]
        keys += [key for key in found if key not in keys]
    return keys


def job_values(hydra_cfg: Any) -> dict[str, str]:
    """This job's value of each override, as typed (`method.lr=1e-5` -> {"method.lr": "1e-5"})."""
    values = {}
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        values[key.lstrip("+~")] = value
    return values


def swept_values(hydra_cfg: Any) -> dict[str, str]:
    """The swept keys with this job's values."""
    values = job_values(hydra_cfg)
    return {key: values[key] for key in swept_keys(hydra_cfg) if key in values}


@functools.lru_cache(maxsize=8)
def command_line_sweeps(record: str, mtime_ns: int) -> tuple[str, ...]:
    """The keys a sweep's command line sweeps, from its multirun.yaml (read once per sweep and version
    of the file: every job of a sweep in one process asks)."""
    overrides = (
        (yaml.safe_load(Path(record).read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task", [])
    )
    parsed = OverridesParser.create().parse_overrides(overrides)
    return tuple(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def short_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def run_name(method: str, concept: str, seed: int, swept: dict[str, str]) -> str:
    """A readable run name: `hypernet-lr1e-5-seed2` (swept keys), or `<method>-<concept>-seed<seed>`."""
    # A config group's value names itself (data=styles -> "styles"); a key needs its name (lr1e-5).
    parts = [
        v if "." not in k else f"{short_name(k)}{v}" for k, v in swept.items() if k not in ("method", "seed")
    ]
    if not parts:
        parts = [concept]
    return "-".join([method, *parts, f"seed{seed}"])


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"method.lr": 1e-5, ...}, so dashboards filter and group by every key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
