"""Held-out validation (data.val_images): a seeded split whose held-out images are measured, never trained
on; a validation loss on the same draws in every run; CLIP-I / DINO against the held-out images; the best
step chosen on them."""

from __future__ import annotations

import csv

import pytest
from conftest import compose, run_train
from PIL import Image

from conceptlab.config import DataConfig
from conceptlab.data import held_out_count, split_images
from conceptlab.errors import ConceptDataError, ConfigError
from conceptlab.sweeps import VAL_LOSS


def split(paths, **keys):
    return split_images(paths, DataConfig(path="unused", **keys))


def test_the_split_is_seeded_nested_and_keeps_the_training_subsets(tmp_path):
    paths = [tmp_path / f"{i:02d}.png" for i in range(20)]
    held = [set(split(paths, val_images=v)[1]) for v in range(6)]
    assert [len(h) for h in held] == list(range(6))
    assert all(a <= b for a, b in zip(held, held[1:]))  # growing held-out sets are nested
    for num in (1, 3, 8):
        train, out = split(paths, val_images=4, num_images=num)
        assert len(train) == num and not set(train) & set(out)
        # the training subset of a run that holds nothing out: a study's subsets stay the same
        assert train == split(paths, val_images=0, num_images=num)[0]
        assert set(train) <= set(split(paths, val_images=4, num_images=num + 2)[0])
    train, out = split(paths, val_images=3)
    assert sorted(train + out) == paths and len(out) == 3
    assert split(paths, val_images=3, subset_seed=1)[1] != out  # another seed, another split
    assert split(paths, val_images=3) == (train, out)


def test_auto_holds_a_fifth_out_of_a_folder_of_ten_or_more():
    assert [held_out_count("auto", n) for n in (1, 5, 9, 10, 14, 20, 28)] == [0, 0, 0, 2, 2, 4, 5]
    assert held_out_count(0, 3) == held_out_count(None, 3) == 0


@pytest.mark.parametrize(
    ("keys", "error", "message"),
    [
        ({"val_images": 5}, ConceptDataError, r"data.val_images=5 but the folder holds only 5 usable images"),
        (
            {"val_images": -1},
            ConfigError,
            r"data.val_images=-1: give a number of images \(0 = none\) or auto",
        ),
        ({"val_images": "some"}, ConfigError, r"data.val_images='some'"),
        (
            {"val_images": 2, "num_images": 4},
            ConceptDataError,
            r"data.num_images=4 but the folder holds only 3 usable images once data.val_images holds 2 out "
            r"\(data.val_images=0 trains on all\)",
        ),
    ],
)
def test_a_split_that_cannot_work_is_one_line(tmp_path, keys, error, message):
    with pytest.raises(error, match=message):
        split([tmp_path / f"{i}.png" for i in range(5)], **keys)


def metrics_rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_a_run_measures_its_held_out_images_on_the_same_draws_as_every_run(tmp_path, tiny_encoders):
    """LoRA starts as the bare model whatever its seed: at step 0 two seeds' validation losses are the same
    number (same images, timesteps and noise) though their training streams differ."""
    metrics = [
        "evaluators=metrics",
        f"encoders.clip={tiny_encoders['clip']}",
        f"encoders.dino={tiny_encoders['dino']}",
    ]
    common = ["method=lora", "data.val_images=2", "evaluate.every_n_steps=2", "method.lr=0.05"]
    runs = {seed: tmp_path / f"seed{seed}" for seed in (0, 1)}
    first = run_train(runs[0], *common, *metrics, "evaluate.best=val/loss", "seed=0")
    second = run_train(runs[1], *common, "evaluators=none", "seed=1")
    for summary in (first, second):
        assert summary["status"] == "completed" and summary["num_images"] == 3
        assert len(summary["held_out_images"]) == 2
        assert not set(summary["held_out_images"]) & set(summary["images"])
    losses = [column(metrics_rows(run), VAL_LOSS) for run in runs.values()]
    assert sorted(losses[0]) == sorted(losses[1]) == [0, 2, 4]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert losses[0][4] != losses[0][0]  # it moves as the concept trains
    seen = column(metrics_rows(runs[0]), "val/loss_seen")
    assert sorted(seen) == [0, 2, 4]
    # CLIP-I / DINO against the held-out images, and against the training ones beside them
    for key in ("metrics/clip_i", "metrics/dino", "metrics/seen_clip_i", "metrics/seen_dino"):
        assert -1 <= first["metrics"][key] <= 1
    # evaluate.best=val/loss: a loss picks the lowest step
    best = first["best"]
    assert best["metric"] == VAL_LOSS and best["value"] == pytest.approx(min(losses[0].values()))
    assert losses[0][best["step"]] == pytest.approx(best["value"])


def test_the_references_are_the_held_out_images():
    from conceptlab.evaluate import real_images, seen_images

    data = compose(["model=tiny", "data.val_images=2"]).data
    held = [Image.open(p).convert("RGB") for p in split_images_of(data)[1]]
    assert [im.tobytes() for im in real_images(data)] == [im.tobytes() for im in held]
    assert len(seen_images(data)) == 3
    everything = compose(["model=tiny", "data.val_images=0"]).data
    assert len(real_images(everything)) == 5 and seen_images(everything) is None


def split_images_of(data):
    from conceptlab.data import list_images, resolve_data_path

    return split_images(list_images(resolve_data_path(data.path)), data)


def fake_run(root, name: str, method: str, rows: list[dict]) -> None:
    """A completed run folder as train.py leaves it, with these metrics.csv rows."""
    import json

    import pandas as pd

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "method": method}))
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)


def test_the_agreement_script_scores_each_choice_against_the_judge(tmp_path, capsys):
    from test_bench import load_script

    script = load_script("heldout_agreement")
    # The judge peaks at step 100. Held-out CLIP-I and loss peak there too; the training images' scores keep
    # rising (memorization) and pick the last step, where the judge has dropped to 0.5.
    steps = [0, 50, 100, 150]
    judge, held, seen = [0.0, 0.6, 0.9, 0.5], [0.1, 0.3, 0.5, 0.4], [0.1, 0.3, 0.5, 0.7]
    loss, loss_seen = [0.3, 0.2, 0.1, 0.25], [0.3, 0.2, 0.1, 0.05]
    rows = []
    for k, step in enumerate(steps):  # evaluators log on rows of their own at the same step
        rows.append({"step": step, "judge/concept": judge[k]})
        rows.append({"step": step, "metrics/clip_i": held[k], "metrics/seen_clip_i": seen[k]})
        rows.append({"step": step, "val/loss": loss[k], "val/loss_seen": loss_seen[k]})
        rows.append({"step": step, "train/loss": 0.2})
    fake_run(tmp_path, "0_ti", "ti", rows)
    frame = script.agreement(tmp_path).set_index("criterion")
    assert frame.loc["held-out CLIP-I", "step"] == 100 and frame.loc["held-out CLIP-I", "regret"] == 0
    assert frame.loc["held-out loss", "step"] == 100 and frame.loc[
        "held-out loss", "spearman"
    ] == pytest.approx(1.0)
    assert frame.loc["training-image CLIP-I", "step"] == 150
    assert frame.loc["training-image CLIP-I", "regret"] == pytest.approx(0.4)
    assert frame.loc["training-image loss", "regret"] == pytest.approx(0.4)
    assert frame.loc["last step", "step"] == 150
    assert script.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| ti | held-out CLIP-I | 0.000 ± 0.000 | 0.80 ± 0.00 | 1 |" in table
    assert script.main([str(tmp_path / "nothing")]) == 2
