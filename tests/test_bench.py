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
    assert '"speedup"' in capsys.readouterr().out


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
    report = bench.main(
        ["--jobs", "3", "--methods", "ti,hypernet", "--batch", "2", "--rounds", "2", "--warmup", "1"]
    )
    assert not report["failed"] and report["same_losses"] is True
    assert report["jobs"] == 3 and report["packed_step_ms"] > 0 and report["alone_steps_ms"] > 0
    assert report["speedup"] == pytest.approx(report["alone_steps_ms"] / report["packed_step_ms"], rel=0.05)
    assert '"speedup"' in capsys.readouterr().out
