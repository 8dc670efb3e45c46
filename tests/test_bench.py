"""The step benchmark runs and reports what it promises (its speed target is checked by running it)."""

import importlib.util

import pytest
from conftest import ROOT


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_step_reports_both_steps(tiny_dir, capsys):
    bench = load_script("bench_step")
    report = bench.main(["--steps", "2", "--rounds", "2", "--warmup", "1", "--num-vectors", "2"])
    assert report["conceptlab"]["trainable_params"] == 2 * 32
    assert report["diffusers_example"]["trainable_params"] == (49408 + 2) * 32  # the whole table trains
    assert report["conceptlab"]["optimizer_state_mb"] < report["diffusers_example"]["optimizer_state_mb"]
    assert report["speedup"] == pytest.approx(
        report["conceptlab"]["steps_per_s"] / report["diffusers_example"]["steps_per_s"], rel=1e-2
    )
    hypernet = report["hypernet"]
    # A (key, value) pair of [1, 2, 1] MLPs (4d² + 3d parameters each) for widths 32 and 64.
    assert hypernet["trainable_params"] == 2 * (4 * 32 * 32 + 3 * 32) + 2 * (4 * 64 * 64 + 3 * 64)
    assert report["hypernet_step_cost_vs_ti"] == pytest.approx(
        report["conceptlab"]["steps_per_s"] / hypernet["steps_per_s"], rel=1e-2
    )
    # The same step in Lightning's loop, as train.py runs it: timed, and set against both.
    lightning = report["conceptlab_lightning"]["steps_per_s"]
    assert lightning > 0
    assert report["lightning_speedup"] == pytest.approx(
        lightning / report["diffusers_example"]["steps_per_s"], rel=1e-2
    )
    assert report["lightning_loop_cost"] == pytest.approx(
        report["conceptlab"]["steps_per_s"] / lightning, rel=1e-2
    )
    assert '"speedup"' in capsys.readouterr().out


@pytest.mark.slow
def test_bench_step_counts_each_steps_flops_at_every_batch_size(tiny_dir):
    bench = load_script("bench_step")
    args = ["--steps", "2", "--rounds", "1", "--warmup", "1", "--batch-size", "1,2", "--peak-tflops", "0.5"]
    report = bench.main(args)
    assert set(report["batches"]) == {"1", "2"} and report["peak_tflops"] == 0.5
    one, two = report["batches"]["1"]["conceptlab"], report["batches"]["2"]["conceptlab"]
    # Every layer's work grows with the batch (the UNet's and the text encoder's alike): twice the FLOPs.
    assert two["gflops_per_step"] == pytest.approx(2 * one["gflops_per_step"], rel=0.1)
    for size, found in report["batches"].items():
        assert found["batch_size"] == int(size)
        for variant in ("conceptlab", "diffusers_example", "hypernet"):
            figures = found[variant]
            assert figures["gflops_per_step"] > 0
            assert figures["images_per_s"] == pytest.approx(figures["steps_per_s"] * int(size), rel=1e-2)
            achieved = figures["gflops_per_step"] * figures["steps_per_s"] / 1000
            assert figures["achieved_tflops"] == pytest.approx(achieved, rel=0.02)
            assert figures["peak_fraction"] == pytest.approx(figures["achieved_tflops"] / 0.5, rel=0.02)
    # The example also encodes the images (the VAE) each step, which conceptlab cached: more work a step.
    assert one["gflops_per_step"] < report["batches"]["1"]["diffusers_example"]["gflops_per_step"]


@pytest.mark.slow
def test_bench_judge_steps_compares_fewer_steps_with_sampling_noise(tmp_path):
    """scripts/bench_judge_steps.py on a short toy-world run: per run the reference, the noise draw and
    each candidate are scored; the summary's changes are those of the runs."""
    from conftest import FAST, compose, read_summary, run_train
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    args = [
        "model=toy",
        "method=ti",
        "trainer.max_steps=2",
        "evaluate.every_n_steps=0",
        "samples.every_n_steps=0",
    ]
    run_train(run_dir, *args)
    assert read_summary(run_dir)["status"] == "completed"
    # What train.py's Hydra leaves beside the run (run_train runs it in-process): the composed config.
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose([*FAST, *args])))
    bench = load_script("bench_judge_steps")
    report = bench.main([str(run_dir), "--steps", "2", "--reference", "3", "--samples", "2"])
    (run,) = report["runs"].values()
    assert set(run) == {"reference", "noise", "steps_2"}
    for key in ("concept", "prompt", "clip_i"):
        change = run["steps_2"][key] - run["reference"][key]
        assert report["summary"][f"{key}/steps_2"]["mean_change"] == pytest.approx(change, abs=1e-4)
        assert report["summary"][f"{key}/noise"]["runs"] == 1


@pytest.mark.slow
def test_bench_sweep_times_both_launchers_on_the_same_jobs(capsys):
    bench = load_script("bench_sweep")
    report = bench.main(["--seeds", "1", "--steps", "3", "--launcher", "both"])
    assert not report["failed"]
    for launcher in ("local", "packed"):
        assert report[launcher]["jobs"] == report[launcher]["completed"] == 2
        assert report[launcher]["time_to_first_step_s"]["max"] > 0
    assert report["same_final_losses"] is True
    assert report["packed_speedup"] == pytest.approx(
        report["local"]["sweep_wall_s"] / report["packed"]["sweep_wall_s"], rel=0.05
    )
    assert '"packed_speedup"' in capsys.readouterr().out


@pytest.mark.slow
def test_bench_pack_times_the_shared_step_against_the_jobs_alone(tiny_dir, capsys):
    bench = load_script("bench_pack")
    report = bench.main("--jobs 3 --methods ti,hypernet --batch 2 --rounds 2 --warmup 1 --profile".split())
    assert not report["failed"] and report["same_losses"] is True
    assert report["jobs"] == 3 and report["packed_step_ms"] > 0 and report["alone_steps_ms"] > 0
    assert report["speedup"] == pytest.approx(report["alone_steps_ms"] / report["packed_step_ms"], rel=0.05)
    # Where the time goes: the tiny UNet's attention and convolutions are found by name, both ways.
    by_kind = report["ms_per_step_by_kind"]
    for way in ("packed", "alone"):
        assert set(by_kind[way]) == {"attention", "convolution", "matmul", "normalization", "other"}
        assert by_kind[way]["attention"] > 0 and by_kind[way]["convolution"] > 0
    assert by_kind["gain"]["convolution"] == pytest.approx(
        by_kind["alone"]["convolution"] / by_kind["packed"]["convolution"], abs=0.01
    )
    assert '"speedup"' in capsys.readouterr().out


def fake_sweeps(walls: dict[str, list[float]], losses: dict[str, list[dict[str, float]]], calls: list):
    """A stand-in for bench_sweep.time_sweep: each launcher's sweeps take the given times in turn."""
    left = {launcher: list(zip(walls[launcher], losses[launcher])) for launcher in walls}

    def time_sweep(seeds, steps, launcher):
        calls.append(launcher)
        wall, found = left[launcher].pop(0)
        result = {"launcher": launcher, "returncode": 0, "jobs": 2, "completed": 2, "sweep_wall_s": wall,
                  "time_to_first_step_s": {"min": 0.5, "median": 0.5, "max": 1.0}}  # fmt: skip
        return result, found

    return time_sweep


def test_bench_sweep_repeat_runs_the_launchers_in_turns_and_takes_each_ones_median(monkeypatch, capsys):
    bench = load_script("bench_sweep")
    same = {"0_ti": 1.5, "1_hypernet": 0.25}
    calls: list[str] = []
    walls = {"local": [50.0, 70.0, 40.0], "packed": [30.0, 20.0, 35.0]}
    monkeypatch.setattr(bench, "time_sweep", fake_sweeps(walls, {k: [same] * 3 for k in walls}, calls))
    report = bench.main(["--launcher", "both", "--repeat", "3"])
    assert calls == ["local", "packed"] * 3  # in turns: a load change hits both launchers alike
    assert report["local"]["sweep_wall_s"] == 50.0 and report["packed"]["sweep_wall_s"] == 30.0
    assert report["packed_speedup"] == round(50 / 30, 2)
    assert [r["speedup"] for r in report["rounds"]] == [round(50 / 30, 2), 3.5, round(40 / 35, 2)]
    assert report["same_final_losses"] is True and not report["failed"]
    assert '"rounds"' in capsys.readouterr().out


def test_bench_sweep_repeat_fails_when_any_round_differs_in_a_jobs_loss(monkeypatch):
    bench = load_script("bench_sweep")
    same, off = {"0_ti": 1.5, "1_hypernet": 0.25}, {"0_ti": 1.5, "1_hypernet": 0.26}
    walls = {"local": [50.0, 50.0], "packed": [30.0, 30.0]}
    losses = {"local": [same, same], "packed": [same, off]}  # the second packed sweep's job differs
    monkeypatch.setattr(bench, "time_sweep", fake_sweeps(walls, losses, []))
    report = bench.main(["--launcher", "both", "--repeat", "2"])
    assert report["same_final_losses"] is False and report["failed"]


def test_bench_sweep_fails_below_the_packed_speedup_asked_for(monkeypatch):
    bench = load_script("bench_sweep")
    same = {"0_ti": 1.5}
    for packed, failed in ((20.0, False), (25.0, True)):  # 2.5x and 2.0x against a 50 s local sweep
        walls = {"local": [50.0], "packed": [packed]}
        monkeypatch.setattr(bench, "time_sweep", fake_sweeps(walls, {k: [same] for k in walls}, []))
        report = bench.main(["--launcher", "both", "--min-speedup", "2.5"])
        assert report["failed"] is failed, report


def test_bench_eval_repeat_alternates_the_runs_and_takes_the_medians(monkeypatch, capsys):
    bench = load_script("bench_eval")
    walls = {"plain1": 10.0, "warm1": 13.0, "plain2": 14.0, "warm2": 20.0, "plain3": 11.0, "warm3": 12.0}
    order: list[str] = []

    def train(run_dir, cache, *overrides):
        order.append(run_dir.name)
        return {"wall_s": walls.get(run_dir.name, 30.0), "first_step_s": 5.0}

    monkeypatch.setattr(bench, "train", train)
    report = bench.main(["--repeat", "3"])["main_command"]
    assert order[2:8] == ["plain1", "warm1", "plain2", "warm2", "plain3", "warm3"]
    assert (
        report["without_evaluation"]["wall_s"] == 11.0
        and report["with_evaluation_cached_baselines"]["wall_s"] == 13.0
    )
    assert report["ratio_cached_baselines"] == round(13 / 11, 2)
    assert report["rounds"][1] == {"without_evaluation_s": 14.0, "with_evaluation_s": 20.0}


@pytest.mark.slow
def test_gpu_checks_script_runs_every_check_on_the_cpu(tiny_dir, tmp_path):
    """scripts/gpu_checks.sh, the one command a lent GPU machine runs, dry on the tiny backbone: every
    check leaves its JSON, so the first GPU run does not find a broken script."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SHAPE": "tiny", "DEVICE": "cpu", "DTYPE": "float32", "COMPILE": "",
           "STEPS": "2", "ROUNDS": "1", "JOBS": "2", "PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("*.json")) == [
        "bench_pack.json",
        "bench_step.json",
        "bench_step_fp16.json",
        "bench_step_sdxl.json",
    ]
    pack = json.loads((out / "bench_pack.json").read_text())
    assert pack["jobs"] == 2 and pack["same_losses"] is True and "ms_per_step_by_kind" in pack
    step = json.loads((out / "bench_step.json").read_text())
    assert set(step["batches"]) == {"1", "4", "16"}
    assert all(found["conceptlab_lightning"]["steps_per_s"] > 0 for found in step["batches"].values())
    fp16 = json.loads((out / "bench_step_fp16.json").read_text())
    # float16 weights under Lightning's loop are for the GPU: on the CPU that variant is left out.
    assert fp16["dtype"] == "float16" and fp16["conceptlab_lightning"] is None and fp16["speedup"] > 0
    assert "bench_step_fp16: done" in proc.stdout
    # SDXL's check, on the tests' SDXL: TI's word in both encoders (32 + 48 wide), LoRA, checkpointed.
    xl = json.loads((out / "bench_step_sdxl.json").read_text())
    assert xl["shape"] == "tiny_xl" and xl["gradient_checkpointing"] is True and xl["batch_size"] == 1
    assert xl["ti"]["trainable_params"] == 32 + 48 and xl["lora"]["trainable_params"] > 0
    assert xl["ti"]["gflops_per_step"] > 0 and xl["lora"]["gflops_per_step"] > 0


def test_gpu_checks_script_goes_on_past_a_failed_check_and_exits_non_zero(tmp_path):
    """A check that fails is reported with its stderr's tail, the others still run, and the exit status
    says so (here a stand-in for python fails every benchmark at once)."""
    import os
    import subprocess

    python = tmp_path / "python"
    python.write_text('#!/bin/sh\ncase "$1" in *.py) echo "no GPU here: $1" >&2; exit 3;; esac\nexit 0\n')
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 1
    for name in ("bench_pack", "bench_step", "bench_step_compiled", "bench_step_fp16", "bench_step_sdxl"):
        assert f"{name}: FAILED" in proc.stdout
    assert "no GPU here: scripts/bench_step.py" in (tmp_path / "out" / "bench_step_fp16.err").read_text()
