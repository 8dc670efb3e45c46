"""The step benchmark runs and reports what it promises (its speed target is checked by running it)."""

import importlib.util

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_step_reports_both_steps(tiny_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "scripts" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--steps", "2", "--warmup", "1", "--num-vectors", "2"])
    assert report["conceptlab"]["trainable_params"] == 2 * 32
    assert report["diffusers_example"]["trainable_params"] == (49408 + 2) * 32  # the whole table trains
    assert report["conceptlab"]["optimizer_state_mb"] < report["diffusers_example"]["optimizer_state_mb"]
    assert report["speedup"] == pytest.approx(
        report["conceptlab"]["steps_per_s"] / report["diffusers_example"]["steps_per_s"], rel=1e-2
    )
    assert '"speedup"' in capsys.readouterr().out
