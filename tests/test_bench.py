"""The step benchmark runs and reports what it promises (its speed target is checked by running it)."""

import importlib.util

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_step_reports_both_steps(tiny_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "scripts" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
