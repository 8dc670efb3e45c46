"""Measure the toy world's targets on the shipped checkpoint (model=toy), as the README records them.

    python scripts/bench_toyworld.py               # ~5 min on 2 CPU cores
    python scripts/bench_toyworld.py --skip caption_following

* caption following: fully named captions, one sample each, read by the judge (shape on large
  objects >= 0.85, colour >= 0.90, style >= 0.90);
* `train.py method=ti data=toy_combo`: the concept's joint accuracy over training, and the training
  seconds until it first reaches 0.8 (target: from <= 0.1 to >= 0.8 within 60 s on 2 CPU cores);
* `train.py method=hypernet data=toy_pastel`: style, shape and colour accuracy at multipliers 1, 0.5, 0
  (target: style >= 0.3 at 1, the bare model at 0; the cost to shape/colour is the trade-off).
Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "samples.every_n_steps=0"]


def train(tmp: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    """Run train.py; return its summary and the metrics.csv rows that hold judge scores."""
    run_dir = tmp / name
    command = [sys.executable, str(ROOT / "train.py"), *overrides, *COMMON, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("judge/concept")]
    return summary, rows


def textual_inversion(tmp: Path) -> dict:
    summary, rows = train(tmp, "ti", "method=ti", "data=toy_combo", "evaluate.every_n_steps=25")
    per_step = summary["train_time_s"] / summary["steps"]
    curve = [(int(r["step"]), round(float(r["judge/concept"]), 3)) for r in rows]
    reached = next((step for step, acc in curve if acc >= 0.8), None)
    return {
        "curve": curve,
        "start": curve[0][1],
        "final": summary["metrics"]["judge/concept"],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "train_s_to_0.8": round(reached * per_step, 1) if reached is not None else None,
    }


def hypernetwork(tmp: Path) -> dict:
    summary, _ = train(tmp, "hypernet", "method=hypernet", "data=toy_pastel", "evaluate.every_n_steps=0")
    judge = summary["metrics"]
    out = {"steps": summary["steps"], "train_time_s": summary["train_time_s"]}
    for m, prefix in (("1", "judge/"), ("0.5", "judge_m0.5/"), ("0", "judge_m0/")):
        out[f"multiplier_{m}"] = {
            a: judge.get(f"{prefix}{key}") for a, key in
            (("style", "concept_style"), ("shape", "prompt_shape"), ("colour", "prompt_colour"))
        }  # fmt: skip
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["caption_following", "ti", "hypernet"])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    report: dict = {}
    if "caption_following" not in args.skip:
        from conceptlab.toyworld.checkpoint import bundled_checkpoint
        from conceptlab.toyworld.pretrain import PretrainConfig, caption_following

        report["caption_following"] = caption_following(bundled_checkpoint(), PretrainConfig())[
            "caption_following"
        ]
    with tempfile.TemporaryDirectory() as tmp:
        if "ti" not in args.skip:
            report["ti_toy_combo"] = textual_inversion(Path(tmp))
        if "hypernet" not in args.skip:
            report["hypernet_toy_pastel"] = hypernetwork(Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
