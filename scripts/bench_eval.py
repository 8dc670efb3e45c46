"""What evaluation costs a run, measured through train.py as a user runs it (one benchmark run).

    python scripts/bench_eval.py                 # ~3 min on 2 CPU cores
    python scripts/bench_eval.py --max-ratio 1.25 --max-first-step 8
    python scripts/bench_eval.py --repeat 3      # without / with evaluation three times each, in turns: medians

* the README's main command (`python train.py`: textual inversion on the toy world) with evaluation and
  sample grids, against the same with `evaluate.enabled=false samples.every_n_steps=0`: wall time of
  each and their ratio, with an empty evaluation cache and with the one the first run left (another
  seed: only what cannot differ between runs is reused; with --repeat, the median of that many of each,
  run in turns);
* the cost of the similarity metrics during training (CLIP-I / CLIP-T, evaluators/toy.yaml's `metrics`):
  the main command with the judge only (`~evaluators.metrics`) against both;
* `method=hypernet data=styles`: seconds from the start of the process to the first training step,
  for a first run (empty cache) and a second one (its baselines cached by the first).

Every run gets a fresh process and its own cache folder (CONCEPTLAB_CACHE), so nothing outside is read.
Prints JSON (and writes it to --out); with --max-ratio / --max-first-step exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger=csv", "trainer.enable_progress_bar=false"]


def train(run_dir: Path, cache: Path, *overrides: str) -> dict:
    """Run train.py in a fresh process; its summary, with the process's wall time and time to first step."""
    env = {**os.environ, "CONCEPTLAB_CACHE": str(cache), "WANDB_MODE": "offline"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    # The record starts after the imports: the process's own start is wall - the record's wall time.
    imports = wall - summary["wall_time_s"]
    return {"wall_s": round(wall, 1), "first_step_s": round(imports + summary["time_to_first_step_s"], 1)}


def median_run(runs: list[dict], key: str = "wall_s") -> dict:
    """The run of median `key` (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--max-ratio", type=float, default=None, help="fail above this main-command ratio")
    parser.add_argument(
        "--max-first-step", type=float, default=None, help="fail above this (second hypernet run)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="rounds of the main command without and with evaluation, in turns; medians (a busy machine varies)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        judge_only = train(tmp / "judge", tmp / "cache-judge", "~evaluators.metrics")
        cold = train(tmp / "cold", tmp / "cache")
        # Without evaluation and with the baselines cold left (other seeds), in turns: the medians.
        plains, warms = [], []
        for k in range(1, args.repeat + 1):
            off = ("evaluate.enabled=false", "samples.every_n_steps=0")
            plains.append(train(tmp / f"plain{k}", tmp / "cache-plain", *off, f"seed={k}"))
            warms.append(train(tmp / f"warm{k}", tmp / "cache", f"seed={k}"))
        plain, warm = median_run(plains), median_run(warms)
        report["main_command"] = {
            "without_evaluation": plain,
            "with_judge_only_empty_cache": judge_only,
            "with_evaluation_empty_cache": cold,
            "similarity_metrics_cost_s": round(cold["wall_s"] - judge_only["wall_s"], 1),
            "with_evaluation_cached_baselines": warm,
            "ratio_empty_cache": round(cold["wall_s"] / plain["wall_s"], 2),
            "ratio_cached_baselines": round(warm["wall_s"] / plain["wall_s"], 2),
        }
        if args.repeat > 1:
            report["main_command"]["rounds"] = [
                {"without_evaluation_s": a["wall_s"], "with_evaluation_s": b["wall_s"]}
                for a, b in zip(plains, warms)
            ]
        hypernet = ["method=hypernet", "data=styles", "trainer.max_steps=1"]
        first = train(tmp / "hn1", tmp / "cache-hn", *hypernet)
        second = train(tmp / "hn2", tmp / "cache-hn", *hypernet)
        report["hypernet_first_step_s"] = {
            "first_run": first["first_step_s"],
            "second_run": second["first_step_s"],
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    missed = []
    if args.max_ratio is not None and report["main_command"]["ratio_cached_baselines"] > args.max_ratio:
        missed.append(
            f"main command ratio {report['main_command']['ratio_cached_baselines']} > {args.max_ratio}"
        )
    if args.max_first_step is not None and second["first_step_s"] > args.max_first_step:
        missed.append(
            f"second hypernet run's first step at {second['first_step_s']} s > {args.max_first_step}"
        )
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
