"""Time a 16-job sweep on the (random) tiny backbone with the default (local) launcher.

    python scripts/bench_sweep.py            # method=ti,hypernet x seed=0..7, 50 steps each

Prints JSON: the sweep's wall time (target: under 5 minutes on 2 CPU cores) and, from each job's
summary.json, the time from job start to its first training step (target: under 10 s).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--launcher", choices=["local", "packed", "both"], default="local",
        help="hydra/launcher: local (Hydra's, one job after another), packed (conceptlab's), or both (the ratio)",
    )  # fmt: skip
    parser.add_argument(
        "--max-sweep-s", type=float, default=None, help="exit non-zero above this (target: 300)"
    )
    parser.add_argument(
        "--max-first-step-s", type=float, default=None, help="exit non-zero above this (target: 10)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, str(ROOT / "train.py"), "-m", "model=tiny", "method=ti,hypernet",
            "seed=" + ",".join(str(s) for s in range(args.seeds)), f"trainer.max_steps={args.steps}",
            "logger=csv", "trainer.enable_progress_bar=false", f"output_root={tmp}",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        summaries = [json.loads(p.read_text()) for p in Path(tmp).glob("multirun/*/*/summary.json")]
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    first = sorted(s["time_to_first_step_s"] for s in summaries if s.get("time_to_first_step_s") is not None)
    report = {
        "jobs": len(summaries),
        "completed": sum(s["status"] == "completed" for s in summaries),
        "sweep_wall_s": round(elapsed, 1),
        "time_to_first_step_s": {"min": first[0], "median": first[len(first) // 2], "max": first[-1]}
        if first
        else None,
        "steps_per_job": args.steps,
    }
    print(json.dumps(report, indent=2))
    failed = proc.returncode != 0
    if args.max_sweep_s is not None and elapsed > args.max_sweep_s:
        failed = True
    if args.max_first_step_s is not None and (not first or first[-1] > args.max_first_step_s):
        failed = True
    report["failed"] = failed
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
