"""Evaluation images drawn once per step for the judge, the metrics and the sample grid together
(conceptlab.sampling.SharedDraws): one batched call per sampler, the same images each would draw alone."""

from __future__ import annotations

import csv
import io
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_train
from PIL import Image

from conceptlab.sampling import Draw, SharedDraws, draw_images


class Counting:
    """The backbone's `sample`, counted: how many calls, how many images."""

    def __init__(self, backbone):
        self.backbone, self.calls, self.images = backbone, 0, 0
        self.original = backbone.sample

    def __call__(self, prompts, seeds, *args, **kwargs):
        self.calls += 1
        self.images += len(prompts)
        return self.original(prompts, seeds, *args, **kwargs)


class Method:
    """A method that is nothing but its inference switch (what SharedDraws and draw_images use)."""

    def __init__(self):
        self.multipliers = []

    @contextmanager
    def inference(self, multiplier=None):
        self.multipliers.append(multiplier)
        yield


class User:
    """Wants its draws at step 0 only."""

    def __init__(self, wanted):
        self.wanted, self.shared = wanted, None

    def draws(self, trainer, module, event):
        return self.wanted.get(event, []) if trainer.global_step == 0 else []


def test_one_batched_call_per_sampler_and_each_user_gets_its_own_images(backbone):
    counting = Counting(backbone)
    backbone.sample = counting
    module = SimpleNamespace(backbone=backbone, method=Method())
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    judge = Draw(("a photo of a robot",) * 2 + ("a robot",) * 2, (0, 1, 0, 1), steps=2, guidance=4.0)
    grid = Draw(("a robot",), (1,), steps=2, guidance=4.0)  # already in the judge's images
    other = Draw(("a robot",), (5,), steps=3, guidance=4.0)  # another sampler: a batch of its own
    half = Draw(("a robot",), (0,), steps=2, guidance=4.0, multiplier=0.5)  # another multiplier too
    users = [User({"batch_end": [judge, half]}), User({"batch_end": [grid, other]}), User({})]
    shared = SharedDraws(users)
    assert all(user.shared is shared for user in users)

    shared.on_train_batch_end(trainer, module, None, None, 0)
    assert counting.calls == 3 and counting.images == 4 + 1 + 1  # the grid's image is the judge's
    assert sorted(module.method.multipliers) == [0.5, 1.0, 1.0]
    for draw in (judge, grid, other, half):
        alone = counting.original(list(draw.texts), list(draw.seeds), draw.steps, draw.guidance)
        torch.testing.assert_close(shared.take(trainer, draw), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(draw_images(users[0], trainer, module, draw), alone, atol=1e-5, rtol=0)
    assert counting.calls == 3  # taken, not drawn again

    # Nothing drawn at this step for an unknown draw, or at a later step: the user samples it itself.
    assert shared.take(trainer, Draw(("a robot",), (9,), steps=2, guidance=4.0)) is None
    trainer.global_step = 1
    assert shared.take(trainer, grid) is None
    draw_images(users[1], trainer, module, grid)
    assert counting.calls == 4
    shared.on_train_batch_end(trainer, module, None, None, 1)  # nobody wants anything at step 1
    assert counting.calls == 4

    # At the end of training (a run that stopped before max_steps): drawn, and kept for the users' hooks.
    users[2].wanted = {"end": [grid]}
    trainer.global_step = 0
    shared.on_train_end(trainer, module)
    assert counting.calls == 5 and shared.take(trainer, grid) is not None
    shared.teardown(trainer, module, "fit")
    assert shared.take(trainer, grid) is None

    # Not the global-zero process (DDP): nothing is drawn ahead there (the evaluators do not run).
    trainer.is_global_zero = False
    shared.on_train_end(trainer, module)
    assert counting.calls == 5


def _eval_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [
            {k: v for k, v in row.items() if v != "" and (k.startswith(("judge", "metrics/")) or k == "step")}
            for row in csv.DictReader(f)
        ]


def test_a_toy_run_samples_once_per_evaluation_step_with_the_same_results(tmp_path, monkeypatch):
    """The README's main command (FAST settings): judge, metrics and grid draw together, one call per
    evaluation step; every score and grid equals the run where each draws its own."""
    from conceptlab import train
    from conceptlab.backbone import Backbone

    calls = []
    original = Backbone.sample

    def counted(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Backbone, "sample", counted)
    # evaluate.every_n_steps=2: the judge and the metrics at steps 0, 2, 4, as the grid (every 2)
    args = ["model=toy", "evaluate.cache=false", "evaluate.every_n_steps=2", "evaluate.num_samples=3"]
    run_train(tmp_path / "shared", *args)
    shared_calls, calls[:] = list(calls), []
    # 3 judge prompts x 3 seeds + the metrics' 2 prompts x 1 seed + the grid's 2 prompts x 1 seed, less
    # the two that are one of the judge's ("a photo of a <toy_combo>" at seed 0 for the metrics and grid)
    assert shared_calls == [9 + 2 + 2 - 2] * 3

    monkeypatch.setattr(train, "shared_draws", lambda callbacks: [])
    run_train(tmp_path / "alone", *args)
    assert sorted(calls) == sorted([9, 2, 2] * 3)

    shared_rows, alone_rows = _eval_rows(tmp_path / "shared"), _eval_rows(tmp_path / "alone")
    assert [r["step"] for r in shared_rows if "judge/concept" in r] == ["0", "2", "4"]
    assert len(shared_rows) == len(alone_rows) and shared_rows
    for ours, theirs in zip(shared_rows, alone_rows):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-3, abs=1e-4), key
    for step in (0, 2, 4):
        name = f"samples/step_{step:06d}.png"
        ours, theirs = (
            np.asarray(Image.open(io.BytesIO((tmp_path / run / name).read_bytes())), dtype=int)
            for run in ("shared", "alone")
        )
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
