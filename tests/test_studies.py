"""The application studies (experiments/style_transfer ... composition): their scores on hand-made
judge readings, a short job of each on the toy world, composition at a sweep's end, and the report."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, compose, read_summary, run_train

from conceptlab.toyworld.studies import (
    composition_scores,
    conflicts,
    distance_to_uniform,
    distribution,
    image_scores,
    normalized_entropy,
    prompt_key,
    scene_mask,
)

STUDIES = {  # experiment -> the metric its report leads with
    "style_transfer": "study/transfer",
    "object_variation": "study/variation",
    "text_guided": "study/text_guided",
    "localized_editing": "study/inside",
    "bias_reduction": "study/tv",
}


def readings(**columns: str) -> dict[str, list[str]]:
    """Judge readings from space-separated values per attribute."""
    return {a: v.split() for a, v in columns.items()}


def test_style_transfer_counts_an_image_only_when_it_has_the_style_and_obeys_its_prompt():
    read = readings(
        style="pastel pastel plain pastel",
        shape="ring square ring circle",
        colour="orange orange orange green",
        size="large large large small",  # the second prompt names no size
    )
    prompts = ["a photo of a large orange ring, {} style", "a photo of a green circle, {} style"]
    scores = image_scores(read, prompts, {"style": "pastel"})
    # image 0: both; 1: style but wrong shape; 2: obeys but plain; 3: both
    assert scores == {"concept": 0.75, "prompt": 0.5, "both": 0.5}


def test_a_prompt_word_that_the_concept_fixes_is_not_asked_twice():
    read = readings(colour="purple red", shape="circle circle")
    scores = image_scores(read, ["a photo of a red circle {}"], {"colour": "purple"})
    assert scores["prompt"] == 1.0 and scores["concept"] == 0.5  # red is the concept's to decide


def test_diversity_is_entropy_over_the_attributes_values_normalized():
    assert normalized_entropy(["small", "large"] * 4, ["small", "large"]) == pytest.approx(1.0)
    assert str(normalized_entropy(["large"] * 8, ["small", "large"])) == "0.0"  # not -0.0
    three = normalized_entropy(["white", "white", "black", "gray"], ["white", "black", "gray"])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert three == pytest.approx(expected)


def test_distance_to_uniform_counts_readings_outside_the_classes_against_it():
    assert distance_to_uniform(distribution(["small", "large"], ["small", "large"]), ["small", "large"]) == 0
    skewed = distribution(["large"] * 3 + ["small"], ["small", "large"])
    assert skewed == {"small": 0.25, "large": 0.75}
    assert distance_to_uniform(skewed, ["small", "large"]) == pytest.approx(0.25)
    shapes = ["circle", "square"]
    shares = distribution(["circle", "moon", "moon", "square"], shapes)
    assert shares == {"circle": 0.25, "square": 0.25, "other": 0.5}
    assert distance_to_uniform(shares, shapes) == pytest.approx(0.5)  # half the mass is off the classes


def test_composition_counts_both_one_or_neither_per_image():
    read = readings(
        shape="diamond diamond circle circle",
        colour="orange orange orange red",
        style="pastel plain pastel plain",
    )
    scores = composition_scores(read, {"shape": "diamond", "colour": "orange"}, {"style": "pastel"})
    assert scores == {"both": 0.25, "first": 0.5, "second": 0.5, "first_only": 0.25, "second_only": 0.25,
                      "neither": 0.25}  # fmt: skip
    assert conflicts({"colour": "orange", "shape": "diamond"}, {"colour": "purple", "style": "striped"}) == [
        "colour"
    ]
    assert conflicts({"shape": "diamond"}, {"style": "pastel"}) == []


def test_the_edit_mask_covers_the_object_and_a_margin():
    from conceptlab.toyworld.world import Scene, render

    scene = Scene("square", "green", "white", "large", "plain", x=20.0, y=18.0)
    mask = scene_mask(scene)
    drawn = (render(scene) != 255).any(axis=2)  # every pixel the object touches
    assert mask[drawn].min() == 1 and 0.2 < mask.mean() < 0.6
    assert prompt_key("a picture of a small {} square") == "a_picture_of_a_small_X_square"


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_study_names_its_metric_and_scores_it_on_the_toy_world(study):
    cfg = compose([f"+experiment={study}"])
    assert cfg.study.metric == STUDIES[study]
    assert cfg.evaluators.study._target_.startswith("conceptlab.toyworld.studies.")
    assert cfg.data.path.startswith("bundled:toy_")


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_each_study_runs_a_short_job_and_records_before_and_after(tmp_path, study):
    run_dir = tmp_path / "run"
    summary = run_train(
        run_dir, f"+experiment={study}", "model=toy", "method=ti", "trainer.max_steps=2",
        "evaluate.every_n_steps=0", "evaluators.study.num_samples=2", "samples.every_n_steps=0",
        "evaluators.judge.cache_dir=null",
    )  # fmt: skip
    assert summary["status"] == "completed"
    metrics = read_summary(run_dir)["metrics"]
    headline = STUDIES[study]
    assert 0 <= metrics[headline] <= 1 and 0 <= metrics[headline.replace("study/", "study_before/")] <= 1
    assert (run_dir / "study" / f"{study}_after.png").is_file()
    assert (run_dir / "study" / f"{study}_before.png").is_file()
    if study == "localized_editing":  # the original pixels stay outside the mask, the inside is redrawn
        assert metrics["study/outside_change"] < 1e-6 < 0.05 < metrics["study/inside_change"]
    if study == "bias_reduction":
        shares = [v for k, v in metrics.items() if k.startswith("study/base_dist_size_")]
        assert sum(shares) == pytest.approx(1.0)
        assert metrics["study/tv_reduction"] == pytest.approx(metrics["study/base_tv"] - metrics["study/tv"])


@pytest.mark.slow
def test_a_study_on_a_model_without_the_judge_trains_and_says_so(tmp_path, caplog):
    summary = run_train(tmp_path / "run", "+experiment=style_transfer", "method=ti")  # model=tiny
    assert summary["status"] == "completed"
    assert not any(k.startswith("study") for k in read_summary(tmp_path / "run")["metrics"])
    assert "needs its judge" in caplog.text


@pytest.mark.slow
def test_composition_sweep_pairs_the_runs_and_the_report_shows_them(tmp_path):
    """`train.py -m +experiment=composition` (two of its jobs): when the sweep ends, the pair of runs is
    sampled together, judged, recorded in composition/composition.json and shown by the report."""
    from conftest import FAST

    sweep_dir = tmp_path / "sweep"
    fast = [a for a in FAST if not a.startswith("model=")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=composition", "model=toy", *fast,
         "trainer.max_steps=2", "evaluate.every_n_steps=0", "samples.every_n_steps=0",
         "method=ti", "data=toy_gem,toy_pastel", "seed=0", f"hydra.sweep.dir={sweep_dir}",
         f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((sweep_dir / "composition" / "composition.json").read_text())
    (row,) = record["rows"]  # toy_gem + toy_pastel by ti + ti, seed 0; toy_combo was not trained here
    assert row["pair"] == "toy_gem + toy_pastel" and row["first_method"] == row["second_method"] == "ti"
    assert row["prompt"] == "a photo of a <toy_gem>, <toy_pastel> style"
    assert row["both"] + row["first_only"] + row["second_only"] + row["neither"] == pytest.approx(1.0)
    assert (sweep_dir / "composition" / row["grid"]).is_file()
    assert "composition:" in proc.stdout

    out = tmp_path / "report"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep_dir), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    page = (out / "report.html").read_text()
    assert "Composition: both concepts in one prompt" in page and "toy_gem + toy_pastel" in page
    assert (out / "samples" / "composition" / row["grid"]).is_file()


@pytest.mark.slow
def test_a_word_learned_from_the_balanced_set_draws_closer_to_uniform_than_the_bare_prompt(tmp_path):
    """The bias-reduction study's effect (measured over 9 runs: distance to uniform 0.26 -> 0.11-0.24):
    textual inversion's recipe on toy_balanced, budgeted by steps."""
    run_dir = tmp_path / "run"
    summary = run_train(
        run_dir, "+experiment=bias_reduction", "method=ti", "model=toy", "logger=csv", "samples.every_n_steps=0",
        "trainer.enable_progress_bar=false", fast=False,
    )  # fmt: skip
    assert summary["status"] == "completed" and summary["max_steps"] == 200
    metrics = read_summary(run_dir)["metrics"]
    assert metrics["study/base_tv"] > 0.2  # the bare model's skew: mostly large, many stars
    assert metrics["study/tv"] < metrics["study/base_tv"]
    assert metrics["study/tv_shape"] < metrics["study/base_tv_shape"]


@pytest.mark.slow
def test_a_study_read_from_the_cache_still_leaves_its_grids(tmp_path, monkeypatch):
    """The same run again (same seed, same starting word): every study score and grid is read from the
    evaluation cache - nothing is sampled - and the run folder still gets its grids."""
    import conceptlab.toyworld.studies as studies

    args = ["+experiment=text_guided", "model=toy", "method=ti", "trainer.max_steps=2",
            "evaluate.every_n_steps=0", "evaluators.study.num_samples=2", "samples.every_n_steps=0"]  # fmt: skip
    run_train(tmp_path / "first", *args)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the study sampled although its scores were cached")

    monkeypatch.setattr(studies, "sample_images", no_sampling)
    run_train(tmp_path / "second", *args)
    first, second = read_summary(tmp_path / "first")["metrics"], read_summary(tmp_path / "second")["metrics"]
    assert {k: v for k, v in first.items() if k.startswith("study")} == {
        k: v for k, v in second.items() if k.startswith("study")
    }
    for name in ("text_guided_before.png", "text_guided_after.png"):
        assert (tmp_path / "second" / "study" / name).read_bytes() == (
            tmp_path / "first" / "study" / name
        ).read_bytes()


def test_the_report_shows_a_studys_columns_and_its_distributions(tmp_path):
    """The answer table carries `study.columns` (mean ± sd per setting, in the table's order); a bias
    study gets its before/after distributions plotted, a value one run never drew counting as 0."""
    import pandas as pd

    from conceptlab.report import Sweep, headline, write_report

    def run(i, method, tv, base_small, small, other=None):
        row = {"run_dir": str(i), "status": "completed", "method": method, "seed": i % 2, "concept": "toy_balanced",
               "study/tv": tv, "study/base_tv": 0.26, "study/base_dist_size_small": base_small,
               "study/base_dist_size_large": 1 - base_small, "study/dist_size_small": small,
               "study/dist_size_large": 1 - small}  # fmt: skip
        if other is not None:
            row["study/dist_size_other"] = other
        return row

    rows = [run(0, "ti", 0.2, 0.25, 0.4), run(1, "ti", 0.1, 0.25, 0.5, other=0.0),
            run(2, "hypernet", 0.3, 0.25, 0.3), run(3, "hypernet", 0.3, 0.25, 0.3)]  # fmt: skip
    study = {
        "name": "bias_reduction",
        "metric": "study/tv",
        "goal": "min",
        "columns": ["study/base_tv", "nope"],
    }
    sweep = Sweep(root=tmp_path, runs=pd.DataFrame(rows), axes=["method", "seed"], study=study,
                  targets=["conceptlab.toyworld.studies.BiasReduction"])  # fmt: skip
    answer = headline(sweep)
    assert list(answer.table["method"]) == ["ti", "hypernet"]  # lower is better
    assert list(answer.extra) == ["study/base_tv"]  # a column the runs lack is left out
    assert answer.extra["study/base_tv"][0] == pytest.approx([0.26, 0.26])
    page = write_report(sweep, tmp_path / "report").read_text()
    assert "<th>study/base_tv</th>" in page and "0.26 ± 0" in page
    assert "plots/study_distributions.png" in page
    assert (tmp_path / "report" / "plots" / "study_distributions.png").stat().st_size > 1000
