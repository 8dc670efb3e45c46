"""Compare the runs of a sweep: runs.csv, plots, side-by-side sample grids and one report.html
(`conceptlab-report <folder>`, `python scripts/report.py <folder>`).

Reads the run records every job leaves (summary.json, metrics.csv, samples/, .hydra/), so it works
offline on a multirun folder; `runs_from_wandb` builds the same table from a W&B group instead. It
knows tables, plots and grids; what a study or an evaluator adds is its own report section
(`report_sections`), named by the objects the runs' configs plug in.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object

from .atomic import atomic_path
from .errors import ConceptLabError, ConfigError, error_line
from .runfolder import RunFolder, find_run_dirs
from .sweeps import LOSS_CAVEAT, TRAINING_LOSS, evidence_order, metric_goal

# wandb load inside the functions that use them, not here: importing them costs wandb ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)
METRICS = [
    "final_loss",
    "mean_loss",
    "steps",
    "steps_per_s",
    "wall_time_s",
    "train_time_s",
    "lr",
    "trainable_params",
]
# A study's metric that the run record keeps under another name.
RECORD_METRICS = {"train/loss": TRAINING_LOSS}
# The loss curves' exponential smoothing (TensorBoard's and W&B's default is 0.6-0.9; steps draw timesteps).
SMOOTHING = 0.9


@dataclass
class Sweep:
    """The runs under a folder, one row each, and what the report needs beside the table."""

    root: Path
    runs: pd.DataFrame
    axes: list[str]  # swept keys, in sweep order
    study: dict[str, Any] = field(default_factory=dict)
    expected_jobs: int | None = None
    # The metrics the runs' evaluators lead with (their `headline`, as each run's record lists them), and
    # those that say what the runs learned (their `evidence`, best first).
    headlines: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    # What the runs' configs plug in (evaluators, the study's end step), by `_target_`: each may bring its
    # own report section (`report_section`).
    targets: list[str] = field(default_factory=list)


def expected_job_count(root: Path) -> int | None:
    """How many jobs the multirun in `root` launches (from its multirun.yaml), if known."""

    record = root / "multirun.yaml"
    if not record.is_file():
        return None
    hydra_cfg = (yaml.safe_load(record.read_text()) or {}).get("hydra", {})
    if (hydra_cfg.get("sweeper") or {}).get("n_trials"):  # a search: its number of trials
        return int(hydra_cfg["sweeper"]["n_trials"])
    overrides = list(hydra_cfg.get("overrides", {}).get("task", []))
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    swept_on_command_line = set()
    counts = []
    for override in OverridesParser.create().parse_overrides(overrides):
        # A key the command line sets replaces the experiment's sweep of it (`seed=0` runs one seed).
        swept_on_command_line.add(override.key_or_group)
        if override.is_sweep_override():
            counts.append(len(list(override.sweep_string_iterator())))
    for key, values in params.items():
        if key not in swept_on_command_line:
            [override] = OverridesParser.create().parse_overrides([f"{key}={values}"])
            counts.append(len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1)
    return math.prod(counts) if counts else 1


def read_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One row: status, identity, swept values and final metrics of a job directory."""
    row: dict[str, Any] = {"run_dir": str(run_dir.relative_to(root)) if run_dir != root else "."}
    summary_path = RunFolder(run_dir).record
    if not summary_path.is_file():
        # Started (Hydra wrote .hydra/) but died before its first record, or is starting now.
        return {
            **row,
            "status": "no record",
            "error": "summary.json missing: the job died early or is starting",
        }
    summary = read_summary(summary_path)
    if isinstance(summary, str):  # the reason it could not be read
        return {**row, "status": "unreadable", "error": f"summary.json: {summary}"}
    try:
        row.update(
            status=summary.get("status"),
            error=summary.get("error"),
            run_name=summary.get("run_name"),
            method=summary.get("method"),
            concept=summary.get("concept"),
            seed=summary.get("seed"),
        )
        for key, value in (summary.get("swept") or {}).items():
            row[key] = value
        row.update({m: summary.get(m) for m in METRICS})
        row.update({f"peak_{k}_mb": v for k, v in (summary.get("peak_memory_mb") or {}).items()})
        row["file_mb"] = concept_file_mb(run_dir, summary)
        # The evaluators' last scores, as their records name them (`<evaluator>/<score>`).
        row.update({k: v for k, v in (summary.get("metrics") or {}).items() if k != "step"})
        row.update(read_eval(run_dir))
    except (AttributeError, TypeError, ValueError) as err:  # fields of the wrong kind
        return {**row, "status": "unreadable", "error": f"summary.json: {type(err).__name__}: {err}"}
    return row


def concept_file_mb(run_dir: Path, summary: dict[str, Any]) -> float | None:
    """The size of the run's concept file as generate.py takes it (concepts/<concept>.safetensors), in MiB."""
    files = [f for f in (summary.get("files") or {}).get("concepts", []) if f.count("/") == 1]
    chosen = next((f for f in files if f.endswith(".safetensors")), files[0] if files else None)
    if chosen is None or not (run_dir / chosen).is_file():
        return None
    return round((run_dir / chosen).stat().st_size / 2**20, 4)


def read_eval(run_dir: Path) -> dict[str, Any]:
    """evaluate.py's metrics of a run (eval/eval.json: eval/clip_i, eval/dino, eval/clip_t, ...)."""
    path = RunFolder(run_dir).eval_record
    if not path.is_file():
        return {}
    record = read_summary(path)
    if isinstance(record, str):
        log.warning("%s is unreadable (%s): its metrics are left out", path, record)
        return {}
    row = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
    row["eval_protocol"] = (record.get("protocol") or {}).get("name")
    return row


def read_summary(path: Path) -> dict[str, Any] | str:
    """A run's summary.json, or why it cannot be read (a job killed mid-write by an old version, a
    disk that filled up, a hand edit): one bad record never stops the report."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    return summary if isinstance(summary, dict) else f"not a JSON object ({type(summary).__name__})"


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config as plain data ({} if it cannot be read: the report goes on without it)."""
    path = RunFolder(run_dir).hydra_config
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("%s is unreadable (%s): the report goes without the study's settings", path, err)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def plugged_targets(config: dict[str, Any]) -> list[str]:
    """The `_target_`s a run's config plugs in: its evaluators and its study's end-of-sweep step."""
    evaluators = config.get("evaluators") or {}
    at_end = (config.get("study") or {}).get("at_end") or {}
    specs = [*(evaluators.values() if isinstance(evaluators, dict) else []), at_end]
    return [str(spec["_target_"]) for spec in specs if isinstance(spec, dict) and spec.get("_target_")]


def report_sections(sweep: Sweep) -> list[Callable[[Sweep, Path], str]]:
    """The sections the sweep's plug-ins bring: the `report_section(sweep, out) -> html` (a function, or its
    dotted path) of each object its configs name: a study renders what it adds itself; the report knows
    none."""
    sections: list[Callable[[Sweep, Path], str]] = []
    for target in sweep.targets:
        try:
            found = get_object(target)
        except Exception as err:  # noqa: BLE001 - a plug-in this installation lacks: its section is left out
            log.warning("%s cannot be imported (%s): its report section is left out", target, err)
            continue
        section = getattr(found, "report_section", None)
        if isinstance(section, str):  # a dotted path: the plug-in need not import the report to name it
            section = get_object(section)
        if callable(section) and section not in sections:
            sections.append(section)
    return sections


def figure(src: str, caption: str) -> str:
    """An image of the report folder with its caption."""
    esc = html.escape
    return (
        f"<figure><img src='{esc(src)}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>"
    )


def collect(root: str | Path) -> Sweep:
    """All runs below root (a multirun folder, one job, or a folder of runs)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"{root} is not a folder; pass a multirun folder (outputs/multirun/<date>) or a runs folder"
        )
    run_dirs = find_run_dirs(root)
    if not run_dirs:
        raise ConfigError(
            f"no run records under {root} (looked for job folders with .hydra/ and summary.json); "
            "pass the folder a sweep wrote, e.g. outputs/multirun/<date>_<time>"
        )
    rows = [read_run(d, root) for d in run_dirs]
    axes: list[str] = []
    headlines: list[str] = []
    evidence: list[str] = []
    for d in run_dirs:
        record = RunFolder(d).record
        summary = read_summary(record) if record.is_file() else {}
        summary = summary if isinstance(summary, dict) else {}
        swept = summary.get("swept")
        for key in swept if isinstance(swept, dict) else {}:
            if key not in axes:
                axes.append(key)
        for key in summary.get("headline") or []:
            if isinstance(key, str) and key not in headlines:
                headlines.append(key)
        for key in summary.get("evidence") or []:
            if isinstance(key, str) and key not in evidence:
                evidence.append(key)
    configs = [read_config(d) for d in run_dirs]
    study = next((c.get("study") or {} for c in configs if c), {})
    targets = list(dict.fromkeys(t for c in configs for t in plugged_targets(c)))
    expected = expected_job_count(root)
    if expected is not None and expected > len(rows):
        # Jobs the sweep has not started (yet): listed, not silently missing.
        rows += [{"run_dir": f"job {i}", "status": "not started"} for i in range(len(rows), expected)]
    return Sweep(root=root, runs=pd.DataFrame(rows), axes=axes, study=study, expected_jobs=expected,
                 headlines=headlines, evidence=evidence, targets=targets)  # fmt: skip


@dataclass
class Headline:
    """The study's answer: its metric per setting (mean, sd and count over seeds), best first."""

    metric: str  # the runs.csv column the table shows
    goal: str  # max | min
    table: pd.DataFrame
    best_run: dict[str, Any]
    note: str = ""  # why the table shows another metric than the study names, if it does
    # The study's other columns (`study.columns`), per row of `table`: {column: (means, sds)}.
    extra: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def headline(sweep: Sweep) -> Headline | None:
    """The table the report leads with: the study's metric for every setting of the swept keys (seeds
    pooled), best first.

    `study.metric` names it; without one (an ad-hoc sweep), or where the runs lack it, the best evidence
    they have stands in (`sweeps.evidence_order`: an evaluator's own score, else CLIP-I), and only where
    nothing scored them the training loss, with a note that it does not compare methods.
    """
    done = completed(sweep.runs)
    if done.empty:
        return None
    asked = sweep.study.get("metric")
    asked = RECORD_METRICS.get(asked, asked)

    def present(metric: str | None) -> bool:
        return bool(metric) and metric in done and done[metric].notna().any()

    metric, note = asked, ""
    if not present(asked):
        metric = next((m for m in evidence_order(sweep.evidence) if present(m)), TRAINING_LOSS)
        if metric == TRAINING_LOSS:
            note = LOSS_CAVEAT
        if asked:
            stand_in = {TRAINING_LOSS: "the final training loss"}.get(metric, metric)
            stand_in += " (CLIP-I)" if metric.endswith("/clip_i") else ""
            note = (
                f"The study's metric {asked} is not in these runs' records (no evaluator on this model computes "
                f"it); {stand_in} stands in. " + note
            ).strip()
    done = done[done[metric].notna()]
    goal = metric_goal(metric, sweep.study.get("goal"))
    settings = [a for a in sweep.axes if a != "seed" and a in done] or ["method"]
    table = (
        done.assign(**{a: done[a].astype(str) for a in settings})
        .groupby(settings)[metric]
        .agg(["mean", "std", "count"])
        .reset_index()
        .sort_values("mean", ascending=goal == "min", kind="stable")
    )
    best = done.loc[done[metric].idxmin() if goal == "min" else done[metric].idxmax()]
    extra = {}
    keyed = done.assign(**{a: done[a].astype(str) for a in settings})
    for column in sweep.study.get("columns") or []:
        if column in keyed and column != metric and keyed[column].notna().any():
            stats = keyed.groupby(settings)[column].agg(["mean", "std"])
            index = [tuple(r[a] for a in settings) if len(settings) > 1 else r[settings[0]]
                     for _, r in table.iterrows()]  # fmt: skip
            extra[column] = (stats["mean"].reindex(index).tolist(), stats["std"].reindex(index).tolist())
    return Headline(metric, goal, table, best.to_dict(), note, extra)


# DreamBooth paper (Ruiz et al. 2023, Table 1): its protocol (30 subjects x 25 prompts x 4 images),
# DINO ViT-S/16 and CLIP ViT-B/32. Shown beside a sweep's table when its protocol is DreamBooth's.
PUBLISHED = pd.DataFrame(
    [
        ("Real images (published)", 0.774, 0.885, None),
        ("DreamBooth, Stable Diffusion (published)", 0.668, 0.803, 0.305),
        ("Textual Inversion, Stable Diffusion (published)", 0.569, 0.780, 0.255),
    ],
    columns=["method", "dino", "clip_i", "clip_t"],
)
SIMILARITY = ("dino", "clip_i", "clip_t")


def similarity_source(runs: pd.DataFrame) -> str | None:
    """Which columns hold the similarity metrics: evaluate.py's full protocol (eval/) when every
    completed run has them, else the in-training ones (metrics/); None when neither."""
    done = completed(runs)
    for prefix in ("eval/", "metrics/"):
        if f"{prefix}clip_i" in done and done[f"{prefix}clip_i"].notna().all() and not done.empty:
            return prefix
    return None


def similarity_table(sweep: Sweep) -> tuple[pd.DataFrame, str] | None:
    """Method rows x DINO / CLIP-I / CLIP-T, mean and sd over runs (seeds), like the published tables."""
    prefix = similarity_source(sweep.runs)
    if prefix is None:
        return None
    done = completed(sweep.runs)
    settings = ["method", *[a for a in sweep.axes if a not in ("seed", "method") and a in done]]
    rows = []
    for key, group in done.groupby(settings, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {"method": " · ".join(f"{k}={v}" if k != "method" else str(v) for k, v in zip(settings, key))}
        for metric in SIMILARITY:
            values = group[f"{prefix}{metric}"] if f"{prefix}{metric}" in group else pd.Series(dtype=float)
            row[metric] = values.mean() if values.notna().any() else None
            row[f"{metric}_sd"] = values.std() if values.notna().sum() > 1 else None
        row["runs"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows), prefix


def published_applies(runs: pd.DataFrame) -> bool:
    return "eval_protocol" in runs and (completed(runs)["eval_protocol"] == "dreambooth").all()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better on both), left to right."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_tradeoff(sweep: Sweep, out: Path) -> str | None:
    """Reconstruction (CLIP-I of "a photo of {}" samples) against editability (CLIP-T of the editing
    prompts): one point per run, each method's Pareto front drawn."""

    prefix = similarity_source(sweep.runs)
    done = completed(sweep.runs)
    x, y = f"{prefix}recon_clip_i", f"{prefix}clip_t"
    if prefix is None or x not in done or y not in done or done[[x, y]].isna().all().any():
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (method, group) in enumerate(done.groupby("method")):
        points = list(zip(group[x], group[y]))
        ax.scatter(group[x], group[y], color=f"C{i}", label=method, alpha=0.8)
        front = pareto_front(points)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color=f"C{i}", linewidth=1.5)
    ax.set_xlabel(f"reconstruction: {x} (higher is better)")
    ax.set_ylabel(f"editability: {y} (higher is better)")
    ax.set_title("Reconstruction vs editability (lines: each method's Pareto front)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, out / "plots" / "reconstruction_vs_editability.png", out)


def metric_curve(run_dir: Path, column: str = "train/loss") -> pd.DataFrame | None:
    """One column of a run's metrics.csv against the optimizer step (the rows that have it)."""
    metrics = RunFolder(run_dir).metrics
    if not metrics.is_file():
        return None
    try:
        frame = pd.read_csv(metrics)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # pandas' parser errors are ValueErrors
        log.warning("%s is unreadable (%s): its curves are left out", metrics, err)
        return None
    if column not in frame or "step" not in frame:
        return None
    return frame[["step", column]].dropna()


def smoothed(values: pd.Series, weight: float = SMOOTHING) -> pd.Series:
    """An exponential moving average, debiased as TensorBoard's and W&B's smoothing are (the first points
    are not pulled towards zero): a per-step loss jumps with the timestep each step draws."""
    return values.ewm(alpha=1 - weight, adjust=True).mean() if weight > 0 else values


def setting_labels(sweep: Sweep, runs: pd.DataFrame) -> tuple[list[str], pd.Series]:
    """What tells the runs' settings apart (the swept keys but the seed; else the method), and each
    run's setting as `key=value, ...` (or the method's name alone)."""
    keys = [a for a in sweep.axes if a != "seed" and a in runs] or ["method"]
    if keys == ["method"]:
        return keys, runs["method"].astype(str)
    return keys, runs.apply(lambda r: ", ".join(f"{k}={r[k]}" for k in keys), axis=1)


def plot_curves(sweep: Sweep, out: Path, column: str = "train/loss") -> str | None:
    """`column` against the optimizer step, one colour per setting: each run faint, the mean over its
    seeds bold with a band of ± one sd. The loss (per step, noisy) is smoothed first; an evaluator's
    scores (a few evaluation steps) are drawn as they are."""
    done = completed(sweep.runs)
    if done.empty:
        return None
    is_loss = "loss" in column
    _, labels = setting_labels(sweep, done)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = 0
    for i, (label, group) in enumerate(done.groupby(labels, sort=False)):
        colour = f"C{i % 10}"
        curves = []
        for run_dir in group["run_dir"]:
            curve = metric_curve(sweep.root / run_dir, column)
            if curve is None or curve.empty:
                continue
            values = curve.set_index("step")[column]
            if is_loss:
                ax.plot(values.index, values.values, color=colour, alpha=0.15, linewidth=0.6)
                values = smoothed(values)
            curves.append(values)
        if not curves:
            continue
        table = pd.concat(curves, axis=1).sort_index()
        mean, sd = table.mean(axis=1), table.std(axis=1).fillna(0)
        ax.plot(mean.index, mean.values, color=colour, linewidth=2, marker=None if is_loss else "o",
                label=f"{label} ({len(curves)} run{'s' * (len(curves) > 1)})")  # fmt: skip
        if len(curves) > 1:
            ax.fill_between(mean.index, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{column} (smoothed, EMA {SMOOTHING:g})" if is_loss else column)
    what = "Training loss" if is_loss else column
    ax.set_title(f"{what}: mean over seeds ± sd" + (", each run faint behind" if is_loss else ""))
    ax.legend(fontsize=8)
    name = "loss_curves.png" if is_loss else f"curves_{file_safe(column)}.png"
    return save_figure(fig, out / "plots" / name, out)


def write_report(sweep: Sweep, out: str | Path) -> Path:
    """runs.csv, plots, sample grids and report.html in `out`; returns the HTML's path."""

    matplotlib.use("Agg")
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    runs = sweep.runs
    with atomic_path(out / "runs.csv") as tmp:
        runs.to_csv(tmp, index=False)
    answer = headline(sweep)
    lead = (
        answer.metric if answer else RECORD_METRICS.get(sweep.study.get("metric"), sweep.study.get("metric"))
    )
    prefix = similarity_source(runs) or "eval/"
    similarity = [f"{prefix}{m}" for m in SIMILARITY]
    metrics = [m for m in dict.fromkeys([lead, *sweep.headlines, *similarity, "final_loss"]) if m in runs]
    # Evaluators' scores over their evaluation steps (metrics.csv), beside the loss.
    scored = [
        m for m in dict.fromkeys([lead, *sweep.headlines]) if m and "/" in m and not m.startswith("eval/")
    ]
    plots = [p for p in [plot_curves(sweep, out), *(plot_curves(sweep, out, m) for m in scored),
                         plot_tradeoff(sweep, out), *(plot_methods(sweep, out, m) for m in metrics)] if p]  # fmt: skip
    plots += [
        p
        for axis in sweep.axes
        if axis not in ("seed", "method")
        for m in metrics
        if (p := plot_axis(sweep, axis, out, m))
    ]
    grids = copy_sample_grids(sweep, out)
    sections = "".join(section(sweep, out) for section in report_sections(sweep))
    page = render_html(sweep, plots, grids, answer, sections, out)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page)
    return out / "report.html"


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"] if "status" in runs else runs.iloc[0:0]


def plot_methods(sweep: Sweep, out: Path, metric: str = "final_loss") -> str | None:
    done = completed(sweep.runs)
    if done.empty or done[metric].isna().all():
        return None
    by = ["method", "concept"] if done["concept"].nunique() > 1 else ["method"]
    stats = done.groupby(by)[metric].agg(["mean", "std", "count"]).reset_index()
    labels = [" / ".join(str(r[k]) for k in by) for _, r in stats.iterrows()]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 4))
    ax.bar(
        labels,
        stats["mean"],
        yerr=stats["std"].fillna(0),
        capsize=4,
        color=[f"C{i}" for i in range(len(labels))],
    )
    ax.set_ylabel(f"{metric} (mean ± sd over runs)")
    ax.set_title(f"{metric} by {' and '.join(by)}")
    name = "methods.png" if metric == "final_loss" else f"methods_{file_safe(metric)}.png"
    return save_figure(fig, out / "plots" / name, out)


def plot_axis(sweep: Sweep, axis: str, out: Path, metric: str = "final_loss") -> str | None:
    """The metric against one swept axis, one line per method, mean ± sd over the other keys (seeds)."""

    done = completed(sweep.runs)
    if done.empty or axis not in done or done[metric].isna().all():
        return None
    values = list(dict.fromkeys(done[axis].astype(str)))  # sweep order
    numeric = all(_is_number(v) for v in values)
    if numeric:
        values = sorted(values, key=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, group) in enumerate(done.groupby("method")):
        stats = group.assign(_x=group[axis].astype(str)).groupby("_x")[metric].agg(["mean", "std"])
        stats = stats.reindex([v for v in values if v in stats.index])
        xs = [float(v) for v in stats.index] if numeric else list(stats.index)
        # A line between categories would suggest an order that is not there: points only.
        ax.errorbar(
            xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=4, label=method, color=f"C{i}",
            linestyle="-" if numeric else "none",
        )  # fmt: skip
    if (
        numeric
        and min(float(v) for v in values) > 0
        and max(float(v) for v in values) / min(float(v) for v in values) >= 10
    ):
        ax.set_xscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{metric} (mean ± sd)")
    ax.set_title(f"{metric} vs {axis}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, out / "plots" / f"{file_safe(metric)}_vs_{file_safe(axis)}.png", out)


def file_safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def save_figure(fig, path: Path, out: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(path.relative_to(out))


def copy_sample_grids(sweep: Sweep, out: Path) -> dict[str, str]:
    """Each completed run's last sample grid (same prompts and seeds across runs), copied beside the report."""
    grids = {}
    for _, row in completed(sweep.runs).iterrows():
        samples = RunFolder(sweep.root / row["run_dir"]).sample_grids()
        if samples:
            name = f"{row.get('run_name') or Path(row['run_dir']).name}_{Path(row['run_dir']).name}.png"
            shutil.copyfile(samples[-1], out / "samples" / name)
            grids[row["run_dir"]] = f"samples/{name}"
    return grids


def render_headline(answer: Headline | None) -> str:
    if answer is None:
        return "<p>No completed runs: no answer yet.</p>"
    esc = html.escape
    settings = [c for c in answer.table.columns if c not in ("mean", "std", "count")]
    head = (
        "".join(f"<th>{esc(c)}</th>" for c in settings)
        + f"<th>{esc(answer.metric)} (mean ± sd)</th><th>runs</th>"
        + "".join(f"<th>{esc(c)}</th>" for c in answer.extra)
    )

    def with_spread(mean: float, sd: float) -> str:
        if pd.isna(mean):
            return "–"
        return f"{mean:.4g}" + ("" if pd.isna(sd) else f" ± {sd:.3g}")

    rows = []
    for i, (_, r) in enumerate(answer.table.iterrows()):
        cells = "".join(f"<td>{esc(str(r[c]))}</td>" for c in settings)
        more = "".join(f"<td>{with_spread(m[i], sd[i])}</td>" for m, sd in answer.extra.values())
        rows.append(
            f"<tr{' class=best' if i == 0 else ''}>{cells}<td>{with_spread(r['mean'], r['std'])}</td>"
            f"<td>{int(r['count'])}</td>{more}</tr>"
        )
    top = answer.table.iloc[0]
    best_setting = ", ".join(f"{c}={top[c]}" for c in settings)
    per_method = ""
    if "method" in settings and len(settings) > 1:  # each method's best setting (the table is best first)
        firsts = answer.table.drop_duplicates("method")
        items = []
        for _, r in firsts.iterrows():
            setting = ", ".join(f"{c}={r[c]}" for c in settings if c != "method")
            spread = "" if pd.isna(r["std"]) else f" ± {r['std']:.3g}"
            items.append(
                f"<li>{esc(str(r['method']))}: {esc(setting)} — {r['mean']:.4g}{spread} ({int(r['count'])} runs)</li>"
            )
        items = "".join(items)
        per_method = f"<p>Best setting of each method:</p><ul>{items}</ul>"
    run = answer.best_run
    return (
        f"<p class=note>{esc(answer.note)}</p>"
        * bool(answer.note)
        + f"<p><b>Best setting by {esc(answer.metric)} ({'higher' if answer.goal == 'max' else 'lower'} is better):"
        f" {esc(best_setting)}</b> — {top['mean']:.4g} over {int(top['count'])} run(s). Best single run: "
        f"{esc(str(run.get('run_name') or run.get('run_dir')))} ({run[answer.metric]:.4g}).</p>"
        f"{per_method}<div class=wide><table><tr>{head}</tr>{''.join(rows)}</table></div>"
    )


def render_similarity(sweep: Sweep) -> str:
    """The published-style table of the similarity metrics."""
    esc = html.escape
    found = similarity_table(sweep)
    if found is None:
        return (
            "<p>No similarity metrics in these runs: <code>python evaluate.py sweep=&lt;this folder&gt;</code> "
            "adds them (or train with <code>evaluators=metrics</code>).</p>"
        )
    table, prefix = found
    source = (
        "evaluate.py's full protocol (eval/)"
        if prefix == "eval/"
        else "the evaluations during training (metrics/)"
    )

    def cell(row, metric):
        value = row.get(metric)
        if value is None or pd.isna(value):
            return "<td>–</td>"
        spread = row.get(f"{metric}_sd")
        return f"<td>{value:.3f}{'' if spread is None or pd.isna(spread) else f' ± {spread:.3f}'}</td>"

    rows = [
        f"<tr><td>{esc(str(r['method']))}</td>{''.join(cell(r, m) for m in SIMILARITY)}<td>{r['runs']}</td></tr>"
        for r in table.to_dict("records")
    ]
    note = ""
    if published_applies(sweep.runs):
        rows += [
            f"<tr class=published><td>{esc(r['method'])}</td>{''.join(cell(r, m) for m in SIMILARITY)}<td></td></tr>"
            for r in PUBLISHED.to_dict("records")
        ]
        note = (
            "<p>Published rows: DreamBooth paper, Table 1 (same protocol, DINO ViT-S/16, CLIP ViT-B/32).</p>"
        )
    return (
        f"<p>Mean ± sd over runs (seeds), from {esc(source)}; higher is better.</p>"
        f"<div class=wide><table><tr><th>method</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>runs</th></tr>"
        f"{''.join(rows)}</table></div>{note}"
    )


def evaluator_columns(runs: pd.DataFrame) -> list[str]:
    """The metrics evaluators left in the runs' records (`group/name`), grouped by prefix."""
    return sorted(c for c in runs.columns if "/" in c and c.split("/")[0] not in ("eval", "metrics"))


def render_sheet(sweep: Sweep, grids: dict[str, str]) -> str:
    """The settings side by side: one row per setting (its first run's last sample grid: the same
    prompts in its rows, the same seeds in its columns, in every row), to compare by eye."""
    done = completed(sweep.runs)
    if done.empty:
        return ""
    _, labels = setting_labels(sweep, done)
    rows = []
    for label, group in done.groupby(labels, sort=False):
        first = next((d for d in group["run_dir"] if d in grids), None)
        if first is not None:
            rows.append(
                f"<tr><th>{html.escape(str(label))}</th><td>{figure(grids[first], f'{label}: {first}')}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<h2>Side by side</h2><p>One row per setting (its first run's last sample grid): the same prompts "
        f"down each grid, the same seeds across.</p><table class=sheet>{''.join(rows)}</table>"
    )


def render_html(
    sweep: Sweep, plots: list[str], grids: dict[str, str], answer: Headline | None = None, sections: str = "",
    out: Path | None = None,
) -> str:  # fmt: skip
    runs = sweep.runs
    counts = runs["status"].value_counts().to_dict() if "status" in runs else {}
    title = sweep.study.get("name") or sweep.root.name
    esc = html.escape
    columns = [
        c
        for c in dict.fromkeys(
            [
                "run_dir",
                "status",
                "run_name",
                "method",
                "concept",
                *sweep.axes,
                *sweep.headlines,
                *(f"{p}{m}" for p in ("eval/", "metrics/") for m in (*SIMILARITY, "recon_clip_i")),
                *evaluator_columns(runs),
                *METRICS,
                "error",
            ]
        )  # fmt: skip
        if c in runs
    ]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for _, row in runs.iterrows():
        cls = "" if row.get("status") == "completed" else ' class="problem"'
        cells = [f"<td>{esc(_fmt(row.get(c)))}</td>" for c in columns]
        run_dir = str(row.get("run_dir"))
        folder = sweep.root / run_dir
        if out is not None and folder.is_dir():  # the run's folder and its last grid, a click away
            link = os.path.relpath(folder, out)
            grid = f" · <a href='{esc(grids[run_dir])}'>last grid</a>" if run_dir in grids else ""
            cells[0] = f"<td><a href='{esc(link)}/'>{esc(run_dir)}</a>{grid}</td>"
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    grid_rows = "".join(figure(src, f"samples of {d}") for d, src in grids.items())
    plot_html = "".join(f"<img src='{esc(p)}' alt='{esc(p)}'>" for p in plots)
    status = ", ".join(f"{n} {esc(str(s))}" for s, n in counts.items())
    expected = f" of {sweep.expected_jobs} expected" if sweep.expected_jobs else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>conceptlab report: {esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}tr.problem{{background:#fde}}img{{max-width:100%}}
figure{{display:inline-block;margin:6px}}figure img{{max-width:320px}}tr.best{{background:#dfd}}
p.note,#broken{{color:#a60}}tr.published{{color:#555;font-style:italic}}
div.wide{{overflow-x:auto;max-width:100%}}div.wide th{{position:sticky;top:0;background:#f4f4f4}}
div.wide td{{white-space:nowrap}}table.sortable th{{cursor:pointer}}
table.sheet th{{text-align:left;vertical-align:middle;padding-right:1em}}table.sheet figure img{{max-width:none}}</style>
<script>
// Says so on the page when a plot or a sample grid is missing (a moved folder, a partial copy).
window.addEventListener("load", () => {{
  const broken = [...document.images].filter(im => !(im.complete && im.naturalWidth > 0));
  document.body.dataset.images = document.images.length;
  document.body.dataset.broken = broken.length;
  if (broken.length) document.getElementById("broken").textContent =
    "Missing images: " + broken.map(im => im.getAttribute("src")).join(", ");
}});
// A click on a column's head sorts the runs by it (numbers as numbers; again: the other way).
document.addEventListener("click", event => {{
  const th = event.target.closest("table.sortable th");
  if (!th) return;
  const table = th.closest("table"), column = th.cellIndex, rows = [...table.rows].slice(1);
  const up = table.dataset.column == column ? table.dataset.up != "true" : true;
  const key = row => {{ const text = row.cells[column].textContent.trim(), n = parseFloat(text);
                       return text === "" ? null : isNaN(n) ? text : n; }};
  rows.sort((a, b) => {{ const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return (typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : typeof x === "number" ? -1 : 1) * (up ? 1 : -1); }});
  rows.forEach(row => table.tBodies[0].appendChild(row));
  table.dataset.column = column; table.dataset.up = up;
}});
</script></head><body>
<p id=broken></p>
<h1>{esc(title)}</h1>
<p>{esc(sweep.study.get("question", ""))}</p>
<p>{len(runs)} runs{expected}: {status}. Folder: <code>{esc(str(sweep.root))}</code>.
Swept: {esc(", ".join(sweep.axes) or "nothing")}. Table: <a href="runs.csv">runs.csv</a>.</p>
<h2>Answer</h2>{render_headline(answer)}
{sections}
<h2>What each method learned (DINO, CLIP-I, CLIP-T)</h2>{render_similarity(sweep)}
{render_sheet(sweep, grids)}
<h2>Runs</h2><p>Click a column's head to sort by it.</p>
<div class=wide><table class=sortable><tr>{head}</tr>{"".join(body)}</table></div>
<h2>Plots</h2>{plot_html or "<p>No completed runs to plot.</p>"}
<h2>Samples (same prompts and seeds in every run; the last grid of each)</h2>{grid_rows or "<p>No sample grids.</p>"}
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def runs_from_wandb(group: str, project: str, entity: str | None) -> Sweep:
    """The same table from a W&B group (online), for runs whose folders are elsewhere."""
    import wandb

    try:
        api = wandb.Api(timeout=30)
        path = f"{entity}/{project}" if entity else project
        runs = list(api.runs(path, filters={"group": group}))
    except Exception as err:  # noqa: BLE001 - wandb raises many kinds; all mean "cannot read the group"
        raise ConfigError(f"could not read W&B group {group!r} in {project!r}: {err}") from err
    if not runs:
        raise ConfigError(f"W&B group {group!r} in {project!r} has no runs")
    rows, axes = [], []
    for run in runs:
        config = dict(run.config)
        tags = dict(t.split("=", 1) for t in run.tags if "=" in t)
        for key in tags:
            if key not in axes:
                axes.append(key)
        rows.append({
            "run_dir": run.name, "status": "completed" if run.state == "finished" else run.state,
            "run_name": run.name, "method": config.get("method.name"), "concept": config.get("concept"),
            "seed": config.get("seed"), **tags, **{m: run.summary.get(m) for m in METRICS},
        })  # fmt: skip
    return Sweep(root=Path("."), runs=pd.DataFrame(rows), axes=axes, study={"name": group})


def main(argv: list[str] | None = None) -> int:
    """The report's command line: a folder (or a W&B group) in, report/ out; 2 on a user's error."""
    parser = argparse.ArgumentParser(
        prog="conceptlab-report",
        description="Compare the runs of a sweep: report.html (opens offline), runs.csv, plots/, samples/.",
    )
    parser.add_argument("folder", nargs="?", help="a multirun folder, a run, or a folder of runs")
    parser.add_argument("--out", help="report folder (default: <folder>/report)")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of a folder")
    parser.add_argument("--wandb-project", default="conceptlab")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    if not args.folder and not args.wandb_group:
        parser.error("give a folder, or --wandb-group")
    try:
        if args.wandb_group:
            sweep = runs_from_wandb(args.wandb_group, args.wandb_project, args.wandb_entity)
            out = Path(args.out or f"report-{args.wandb_group}")
        else:
            sweep = collect(args.folder)
            out = Path(args.out or Path(args.folder) / "report")
        page = write_report(sweep, out)
    except ConceptLabError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    counts = sweep.runs["status"].value_counts().to_dict()
    print(f"{page}  ({len(sweep.runs)} runs: {', '.join(f'{n} {s}' for s, n in counts.items())})")
    answer = headline(sweep)
    if answer is not None:
        print(best_line(answer))
    return 0


def best_line(answer: Headline) -> str:
    """The answer in one line for the console (with the note when the loss stands in)."""
    top = answer.table.iloc[0]
    setting = ", ".join(f"{c}={top[c]}" for c in answer.table.columns if c not in ("mean", "std", "count"))
    line = f"best by {answer.metric}: {setting} ({top['mean']:.4g} over {int(top['count'])} run(s))"
    return f"{line}\n  note: {answer.note}" if answer.note else line
