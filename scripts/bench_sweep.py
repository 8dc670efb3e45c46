"""Time a 16-job sweep on the (random) tiny backbone, with Hydra's local launcher or conceptlab's packed one.

    python scripts/bench_sweep.py                     # method=ti,hypernet x seed=0..7, 50 steps each, local
    python scripts/bench_sweep.py --launcher packed   # the same sweep, hydra/launcher=packed
    python scripts/bench_sweep.py --launcher both     # both, one after the other, and the speed-up
    python scripts/bench_sweep.py --launcher both --repeat 3   # three rounds in turns: the median speed-up
    python scripts/bench_sweep.py --launcher both --repeat 3 --min-speedup 2.5   # fails below the target

Prints JSON: each sweep's wall time (target, local: under 5 minutes on 2 CPU cores) and, from each job's
summary.json, the time from job start to its first training step (target: under 10 s), and with
`both` the packed sweep's speed-up and whether every job's final loss matches (same seeds). With
--repeat N each launcher's sweep runs N times, in turns (this machine's load moves a single run by
20-40%): the median sweep of each, the speed-up of the medians, and every round's times.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_eval import median_run  # noqa: E402 - the median of repeated runs, as bench_eval takes it


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
    parser.add_argument(
        "--repeat", type=int, default=1, help="sweeps per launcher, in turns; the median of each"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=None,
        help="with --launcher both: exit non-zero below this packed speed-up (target: 2.5)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    launchers = ["local", "packed"] if args.launcher == "both" else [args.launcher]
    report: dict = {"steps_per_job": args.steps}
    rounds: dict[str, list[dict]] = {launcher: [] for launcher in launchers}
    losses: dict[str, list[dict[str, float]]] = {launcher: [] for launcher in launchers}
    for _ in range(args.repeat):
        for launcher in launchers:
            result, found = time_sweep(args.seeds, args.steps, launcher)
            rounds[launcher].append(result)
            losses[launcher].append(found)
    failed = False
    for launcher in launchers:
        result = report[launcher] = median_run(rounds[launcher], "sweep_wall_s")
        failed |= any(r["returncode"] != 0 for r in rounds[launcher])
        first = result["time_to_first_step_s"]
        if args.max_sweep_s is not None and result["sweep_wall_s"] > args.max_sweep_s:
            failed = True
        if args.max_first_step_s is not None and (not first or first["max"] > args.max_first_step_s):
            failed = True
    if len(launchers) == 2:
        report["packed_speedup"] = round(
            report["local"]["sweep_wall_s"] / report["packed"]["sweep_wall_s"], 2
        )
        # Every sweep, of either launcher, against the first local one: the same jobs, the same losses.
        reference = losses["local"][0]
        same = all(
            found.keys() == reference.keys()
            and all(abs(found[job] - reference[job]) <= 1e-4 * abs(reference[job]) for job in reference)
            for found in losses["local"] + losses["packed"]
        )
        report["same_final_losses"] = same
        failed |= not same
        failed |= args.min_speedup is not None and report["packed_speedup"] < args.min_speedup
        if args.repeat > 1:
            report["rounds"] = [
                {"local_s": a["sweep_wall_s"], "packed_s": b["sweep_wall_s"],
                 "speedup": round(a["sweep_wall_s"] / b["sweep_wall_s"], 2)}
                for a, b in zip(rounds["local"], rounds["packed"])
            ]  # fmt: skip
    elif args.repeat > 1:
        report["rounds"] = [{f"{launchers[0]}_s": r["sweep_wall_s"]} for r in rounds[launchers[0]]]
    print(json.dumps(report, indent=2))
    report["failed"] = failed
    return report


def time_sweep(seeds: int, steps: int, launcher: str) -> tuple[dict, dict[str, float]]:
    """One sweep's wall time and its jobs' time to the first step; and each job's final loss."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, str(ROOT / "train.py"), "-m", "model=tiny", "method=ti,hypernet",
            "seed=" + ",".join(str(s) for s in range(seeds)), f"trainer.max_steps={steps}",
            "logger=csv", "trainer.enable_progress_bar=false", f"output_root={tmp}",
            *(["hydra/launcher=packed"] if launcher == "packed" else []),
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        summaries = [json.loads(p.read_text()) for p in Path(tmp).glob("multirun/*/*/summary.json")]
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    first = sorted(s["time_to_first_step_s"] for s in summaries if s.get("time_to_first_step_s") is not None)
    result = {
        "launcher": launcher,
        "returncode": proc.returncode,
        "jobs": len(summaries),
        "completed": sum(s["status"] == "completed" for s in summaries),
        "sweep_wall_s": round(elapsed, 1),
        "time_to_first_step_s": {"min": first[0], "median": first[len(first) // 2], "max": first[-1]}
        if first
        else None,
    }
    return result, {
        Path(s["run_dir"]).name: s["final_loss"] for s in summaries if s.get("final_loss") is not None
    }


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
