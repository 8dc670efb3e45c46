"""The toy world's sections of the report: each study and the judge render what they add to a
sweep's answer (conceptlab.report calls them through the `report_section` their classes name).

* the judge: how far the similarity metrics agree with its ground truth;
* every study: its samples after training; bias reduction: the distributions before and after;
* composition: the pairs of concepts sampled together.
"""

from __future__ import annotations

import html
import logging
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..report import Sweep, completed, figure, file_safe, read_summary, save_figure
from ..runfolder import RunFolder

log = logging.getLogger(__name__)


def judge_section(sweep: Sweep, out: Path) -> str:
    """How far each similarity metric ranks the runs as the judge's ground truth does."""
    agreement = metric_agreement(sweep.runs)
    if not agreement:
        return ""
    esc = html.escape
    items = "".join(
        f"<li><code>{esc(m)}</code> vs <code>{esc(t)}</code>: Spearman ρ = {rho:.2f} over {n} runs</li>"
        for m, t, rho, n in agreement
    )
    return f"<h2>The metrics against the judge</h2><p>How far the metrics agree with the judge's ground truth:</p><ul>{items}</ul>"


def study_section(sweep: Sweep, out: Path) -> str:
    """The study's own samples after training (first seed of each setting)."""
    grids = copy_study_grids(sweep, out)
    if not grids:
        return ""
    figures = "".join(figure(src, f"study samples of {label}") for label, src in grids.items())
    return f"<h2>The study's samples (after training, first seed of each setting)</h2>{figures}"


def bias_section(sweep: Sweep, out: Path) -> str:
    """Bias reduction: the distributions the judge reads before and after, then the study's samples."""
    distributions = plot_distributions(sweep, out)
    shown = (
        "<h2>Distributions before and after</h2><p>Share of each value the judge reads; dotted: uniform.</p>"
        f"<img src='{html.escape(distributions)}' alt='distributions of the bare prompt and the learned words'>"
        if distributions
        else ""
    )
    return shown + study_section(sweep, out)


def composition_section(sweep: Sweep, out: Path) -> str:
    """The composition study's pairs: which concept shows when both are asked for."""
    return render_composition(sweep, out)


def metric_agreement(runs: pd.DataFrame) -> list[tuple[str, str, float, int]]:
    """Spearman rank correlation across runs of each similarity metric with the judge's ground truth
    (toy world): (metric, judge column, rho, runs)."""
    done = completed(runs)
    out = []
    for prefix in ("eval/", "metrics/"):
        for metric, truth in (
            ("clip_i", "judge/concept"),
            ("recon_clip_i", "judge/concept"),
            ("clip_t", "judge/prompt"),
        ):
            column = f"{prefix}{metric}"
            if column in done and truth in done:
                pair = done[[column, truth]].dropna()
                if len(pair) >= 3 and pair[column].nunique() > 1 and pair[truth].nunique() > 1:
                    # Spearman's rho: the Pearson correlation of the ranks (ties share their mean rank).
                    rho = float(pair[column].rank().corr(pair[truth].rank()))
                    out.append((column, truth, rho, len(pair)))
    return out


def plot_distributions(sweep: Sweep, out: Path) -> str | None:
    """Bias reduction: per attribute, the judge's readings of the bare prompt (`study/base_dist_*`) and of
    each method's learned word (`study/dist_*`), mean over seeds, against the uniform share."""
    done = completed(sweep.runs)
    columns = [c for c in done.columns if c.startswith("study/dist_") and done[c].notna().any()]
    if not columns:
        return None
    attributes = list(dict.fromkeys(c.removeprefix("study/dist_").split("_", 1)[0] for c in columns))
    fig, axes = plt.subplots(1, len(attributes), figsize=(6 * len(attributes), 4), squeeze=False)
    for ax, attribute in zip(axes[0], attributes):
        values = [
            c.removeprefix(f"study/dist_{attribute}_")
            for c in columns
            if c.startswith(f"study/dist_{attribute}_")
        ]
        # A value some runs never drew (`other`) has no column in theirs: a share of 0.
        bars = {"bare prompt": done.reindex(columns=[f"study/base_dist_{attribute}_{v}" for v in values])}
        for method, group in done.groupby("method"):
            bars[str(method)] = group.reindex(columns=[f"study/dist_{attribute}_{v}" for v in values])
        bars = {label: table.fillna(0).mean() for label, table in bars.items()}
        width = 0.8 / len(bars)
        for i, (label, shares) in enumerate(bars.items()):
            ax.bar(
                [x + i * width for x in range(len(values))], shares.values, width, label=label, color=f"C{i}"
            )
        uniform = 1 / len([v for v in values if v != "other"])
        ax.axhline(uniform, color="black", linestyle=":", label="uniform")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(values))], values)
        ax.set_ylabel("share of samples (judge)")
        ax.set_title(f"{attribute}: bare prompt vs learned word")
        ax.legend(fontsize=8)
    return save_figure(fig, out / "plots" / "study_distributions.png", out)


def composition_table(root: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """<sweep>/composition/composition.json (the composition study): its rows, and per pair of concepts
    and methods the mean and sd over seeds."""
    path = Path(root) / "composition" / "composition.json"
    if not path.is_file():
        return None
    record = read_summary(path)
    if isinstance(record, str) or not record.get("rows"):
        log.warning("%s is unreadable or empty: the composition table is left out", path)
        return None
    rows = pd.DataFrame(record["rows"])
    keys = ["pair", "first_method", "second_method"]
    scores = ["both", "first_only", "second_only", "neither"]
    stats = rows.groupby(keys, sort=False)[scores].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats["runs"] = rows.groupby(keys, sort=False).size()
    return rows, stats.reset_index()


def render_composition(sweep: Sweep, out: Path) -> str:
    found = composition_table(sweep.root)
    if found is None:
        return ""
    rows, stats = found
    esc = html.escape
    scores = ["both", "first_only", "second_only", "neither"]
    body = []
    for _, r in stats.iterrows():
        cells = "".join(
            f"<td>{r[f'{m}_mean']:.3f}"
            + ("" if pd.isna(r[f"{m}_std"]) else f" ± {r[f'{m}_std']:.3f}")
            + "</td>"
            for m in scores
        )
        body.append(
            f"<tr><td>{esc(r['pair'])}</td><td>{esc(str(r['first_method']))}</td>"
            f"<td>{esc(str(r['second_method']))}</td>{cells}<td>{int(r['runs'])}</td></tr>"
        )
    conflicting = sorted({p for p, c in zip(rows["pair"], rows["conflicting"]) if c})
    note = (
        f"<p class=note>{esc(', '.join(conflicting))}: the two concepts fix the same attribute differently, so no "
        "single object of the toy world (one object per picture) can show both: these rows say which one wins.</p>"
        if conflicting else ""
    )  # fmt: skip
    (out / "samples" / "composition").mkdir(parents=True, exist_ok=True)
    figures = []
    for (pair, first, second), group in rows.groupby(["pair", "first_method", "second_method"], sort=False):
        grid = sweep.root / "composition" / str(group.iloc[0]["grid"])
        if grid.is_file():
            shutil.copyfile(grid, out / "samples" / "composition" / grid.name)
            label = f"{pair}: {first} + {second}, seed {group.iloc[0]['seed']} ({group.iloc[0]['prompt']})"
            figures.append(
                f"<figure><img src='samples/composition/{esc(grid.name)}' alt='{esc(label)}'>"
                f"<figcaption>{esc(label)}</figcaption></figure>"
            )
    return (
        "<h2>Composition: both concepts in one prompt</h2><p>Share of samples (judge) showing both concepts, "
        "only the first, only the second, or neither; mean ± sd over seeds.</p>"
        "<div class=wide><table><tr><th>concepts</th><th>first by</th><th>second by</th><th>both</th>"
        f"<th>first only</th><th>second only</th><th>neither</th><th>runs</th></tr>{''.join(body)}</table></div>"
        f"{note}{''.join(figures)}"
    )


def copy_study_grids(sweep: Sweep, out: Path) -> dict[str, str]:
    """The study's own samples (<run>/study/*_after.png) of the first run of each setting."""
    done = completed(sweep.runs)
    settings = [a for a in sweep.axes if a != "seed" and a in done] or ["method"]
    grids = {}
    for key, group in done.groupby(settings, sort=False) if not done.empty else []:
        run_dir = group.iloc[0]["run_dir"]
        for grid in sorted(RunFolder(sweep.root / run_dir).study.glob("*_after.png")):
            (out / "samples" / "study").mkdir(parents=True, exist_ok=True)
            name = f"{file_safe(str(run_dir))}_{grid.name}"
            shutil.copyfile(grid, out / "samples" / "study" / name)
            label = ", ".join(f"{a}={v}" for a, v in zip(settings, key if isinstance(key, tuple) else (key,)))
            grids[f"{label} ({run_dir}, {grid.stem.removesuffix('_after')})"] = f"samples/study/{name}"
    return grids
