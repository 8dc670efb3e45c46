"""Which best-step choice agrees with the judge: held-out images or the training images? (issue 29)

    python train.py -m +experiment=heldout hydra/launcher=packed
    python scripts/heldout_agreement.py <the sweep's folder>          # a markdown table; --json for data

Each run's metrics.csv holds, at every evaluation step, the judge's concept score (ground truth on the toy
world) and the scores a run without a judge would choose its best step by: CLIP-I against the held-out
images (`metrics/clip_i`) and against the training images (`metrics/seen_clip_i`), the validation loss of
the held-out images (`val/loss`) and of the training images (`val/loss_seen`). For each criterion and run:
the step it picks, the judge's score there short of the judge's best (regret: 0 = it picked as well as the
judge would), and the rank correlation over the steps of the criterion with the judge (Spearman; losses
negated). The last step stands beside them as what a run that chooses nothing gets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from conceptlab.runfolder import RunFolder, find_run_dirs

JUDGE = "judge/concept"
# criterion: (metric, goal)
CRITERIA = {
    "held-out CLIP-I": ("metrics/clip_i", "max"),
    "training-image CLIP-I": ("metrics/seen_clip_i", "max"),
    "held-out loss": ("val/loss", "min"),
    "training-image loss": ("val/loss_seen", "min"),
    "last step": ("step", "max"),
}


def steps_table(run_dir: Path) -> pd.DataFrame:
    """One row per evaluation step: the judge and each criterion's metric (the last value logged there)."""
    rows = pd.read_csv(RunFolder(run_dir).metrics)
    wanted = [JUDGE, *(metric for metric, _ in CRITERIA.values() if metric != "step")]
    present = [key for key in wanted if key in rows]
    table = rows[["step", *present]].groupby("step").last().dropna(subset=[JUDGE]).reset_index()
    return table


def choices(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per criterion: the step it picks, the judge's regret there and its rank agreement with the judge."""
    best_judge = table[JUDGE].max()
    out = {}
    for name, (metric, goal) in CRITERIA.items():
        scored = table.dropna(subset=[metric])
        if scored.empty:
            continue
        pick = scored.loc[scored[metric].idxmax() if goal == "max" else scored[metric].idxmin()]
        signed = scored[metric] if goal == "max" else -scored[metric]
        agreement = (
            signed.corr(scored[JUDGE], method="spearman") if scored[JUDGE].nunique() > 1 else float("nan")
        )
        out[name] = {
            "step": int(pick["step"]),
            "regret": float(best_judge - pick[JUDGE]),
            "spearman": float(agreement),
        }
    return out


def agreement(sweep: Path) -> pd.DataFrame:
    """Every completed run's choices: one row per (run, criterion) with its method."""
    rows = []
    for run_dir in find_run_dirs(sweep):
        summary = json.loads(RunFolder(run_dir).record.read_text())
        if summary.get("status") != "completed" or not RunFolder(run_dir).metrics.is_file():
            continue
        for name, values in choices(steps_table(run_dir)).items():
            rows.append({"run": run_dir.name, "method": summary["method"], "criterion": name, **values})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """Per method and criterion: the judge's regret at the picked step and the rank agreement, mean ± sd."""
    lines = [
        "| method | criterion | judge regret (0 = the judge's best step) | rank agreement with the judge | runs |",
        "|---|---|---|---|---|",
    ]
    order = list(CRITERIA)
    grouped = frame.groupby(["method", "criterion"])
    for (method, criterion), group in sorted(grouped, key=lambda g: (g[0][0], order.index(g[0][1]))):
        regret, rho = group["regret"], group["spearman"]
        lines.append(
            f"| {method} | {criterion} | {regret.mean():.3f} ± {regret.std(ddof=1) if len(group) > 1 else 0:.3f} "
            f"| {rho.mean():.2f} ± {rho.std(ddof=1) if len(group) > 1 else 0:.2f} | {len(group)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's folder (multirun/<date>)")
    parser.add_argument(
        "--json", action="store_true", help="every run's choices as JSON instead of the table"
    )
    args = parser.parse_args(argv)
    frame = agreement(args.sweep)
    if frame.empty:
        print(f"error: no completed run with metrics.csv below {args.sweep}", file=sys.stderr)
        return 2
    print(frame.to_json(orient="records", indent=1) if args.json else markdown(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
