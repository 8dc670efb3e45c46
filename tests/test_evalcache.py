"""Evaluations computed once: scores and sample grids whose every input was seen before are read back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_train

from conceptlab.evalcache import EvaluationCache, method_state


def test_entries_round_trip_and_a_damaged_one_is_recomputed(tmp_path):
    cache = EvaluationCache(tmp_path)
    key = cache.key(kind="x", prompts=["a"], seeds=[0, 1])
    assert cache.get(key) is None
    cache.put(key, {"judge": 0.5})
    assert cache.get(key) == {"judge": 0.5}
    assert cache.key(kind="x", prompts=["a"], seeds=[0, 2]) != key  # any input differs: another entry
    next(tmp_path.rglob("*.json")).write_text("{not json")
    assert cache.get(key) is None


def test_the_bare_model_is_one_state_whatever_a_hypernetwork_learned(backbone):
    from conceptlab.methods.hypernetwork import Hypernetwork

    hn = Hypernetwork(name="hypernet", lr=1e-5, scale_lr=False, concept="ink")
    hn.attach(backbone)
    before = method_state(hn, 1.0)
    with torch.no_grad():
        next(iter(hn.trainable_parameters())).add_(1.0)
    assert method_state(hn, 1.0) != before  # the learned state is part of the key...
    assert method_state(hn, 0.0) == "bare"  # ...except at multiplier 0, where nothing of it applies


TOY_RUN = ["model=toy", "trainer.max_steps=2", "evaluate.num_samples=2", "evaluate.num_inference_steps=2",
           "samples.num_inference_steps=2", "samples.seeds=[0]"]  # fmt: skip


@pytest.mark.parametrize("method", ["ti", "hypernet"])
def test_a_second_run_reads_the_step_0_evaluation_and_grid_of_the_first(tmp_path, monkeypatch, method):
    import conceptlab.backbone
    import conceptlab.toyworld.evaluate

    monkeypatch.setenv("CONCEPTLAB_CACHE", str(tmp_path / "cache"))
    sampled = []
    real = conceptlab.backbone.Backbone.sample

    def counting(self, prompts, *args, progress=None, **kwargs):
        sampled.append(progress or "grid")
        return real(self, prompts, *args, progress=progress, **kwargs)

    monkeypatch.setattr(conceptlab.backbone.Backbone, "sample", counting)
    args = [*TOY_RUN, f"method={method}", "data=styles" if method == "hypernet" else "data=objects"]
    first = run_train(tmp_path / "first", *args)
    first_calls = len(sampled)
    sampled.clear()
    second = run_train(tmp_path / "second", *args, "seed=0")  # the same starting state (the same seed)
    assert len(sampled) == 0, sampled  # every evaluation and grid of this run was computed before
    assert second["metrics"] == first["metrics"] and second["metrics_at_start"] == first["metrics_at_start"]
    grids = sorted((tmp_path / "second" / "samples").glob("*.png"))
    assert grids and all(
        g.read_bytes() == (tmp_path / "first" / "samples" / g.name).read_bytes() for g in grids
    )
    # evaluate.cache=false computes everything again.
    sampled.clear()
    run_train(tmp_path / "third", *args, "evaluate.cache=false")
    # Within the first run already, a hypernetwork's bare model (x0) at the end was its step 0's.
    assert len(sampled) == first_calls + (1 if method == "hypernet" else 0)
    entries = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "evaluations").rglob("*.json")]
    assert entries and all("value" in e for e in entries)
