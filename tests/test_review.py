"""Reviewing a sweep: the report and the console answer with the best evidence the runs have (never the
loss where anything else scored them), curves are smoothed with seeds as bands, and every grid a person
opens shows readable cells with labels."""

import contextlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT
from PIL import Image
from test_sweeps import chromium

from conceptlab.callbacks import grid_png
from conceptlab.inference import MIN_CELL, labelled_grid, readable
from conceptlab.report import collect, headline, main, smoothed
from conceptlab.sweeps import LOSS_CAVEAT, evidence_order

JUDGE = "conceptlab.toyworld.evaluate.JudgeEvaluation"
METRICS = "conceptlab.evaluate.MetricEvaluation"


def write_run(sweep, num, method, seed, final_loss, scores, evaluators=(JUDGE, METRICS)):
    """A job folder as train.py leaves it: .hydra/config.yaml, summary.json, metrics.csv and a grid."""
    run = sweep / f"{num}_{method}"
    (run / ".hydra").mkdir(parents=True)
    evaluator_cfg = {name.rsplit(".", 1)[-1]: {"_target_": name} for name in evaluators}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"evaluators": evaluator_cfg, "study": {}}))
    evidence = [{JUDGE: "judge/concept", METRICS: "metrics/clip_i"}[e] for e in evaluators]
    summary = {
        "status": "completed", "method": method, "concept": "toy_combo", "seed": seed,
        "run_name": f"{method}-seed{seed}", "swept": {"method": method, "seed": str(seed)},
        "final_loss": final_loss, "metrics": {"step": 60, **scores}, "evidence": evidence,
        "headline": [m for m in ("judge/concept", "metrics/clip_i") if m in scores],
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    noise = np.random.default_rng(num).uniform(0.02, 0.25, 61)  # a per-step loss jumps with its timestep
    frame = pd.DataFrame({"step": range(61), "train/loss": noise})
    for key, value in scores.items():
        frame[key] = np.nan
        frame.loc[[0, 30, 60], key] = [0.0, value / 2, value]
    frame.to_csv(run / "metrics.csv", index=False)
    (run / "samples").mkdir()
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(num))
    (run / "samples" / "step_000060.png").write_bytes(
        grid_png(pixels, ["a photo of {}", "{} on a beach"], [0, 1])
    )
    return run


@pytest.fixture(scope="module")
def ti_beats_lora_by_the_judge(tmp_path_factory):
    """TI learned the concept (judge 1.0) and LoRA did not (0.4), though LoRA's training loss is lower;
    the sweep's report written once by scripts/report.py: (sweep folder, what the command printed)."""
    sweep = tmp_path_factory.mktemp("review") / "sweep"
    for num, (method, seed) in enumerate([("ti", 0), ("ti", 1), ("lora", 0), ("lora", 1)]):
        learned = method == "ti"
        scores = {"judge/concept": 1.0 if learned else 0.4, "metrics/clip_i": 0.48 if learned else 0.16}
        write_run(sweep, num, method, seed, final_loss=0.09 if learned else 0.03, scores=scores)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # report.main is what scripts/report.py runs
        assert main([str(sweep)]) == 0
    return sweep, printed.getvalue()


def test_without_a_study_metric_the_judge_answers_not_the_loss(ti_beats_lora_by_the_judge):
    sweep, printed = ti_beats_lora_by_the_judge
    assert "best by judge/concept: method=ti (1 over 2 run(s))" in printed
    page = (sweep / "report" / "report.html").read_text()
    assert "Best setting by judge/concept (higher is better): method=ti</b>" in page
    assert "does not compare methods" not in page


def test_the_evidence_goes_judge_then_clip_i_from_evaluation_then_from_training_then_the_loss(tmp_path):
    assert evidence_order(["judge/concept", "metrics/clip_i"]) == [
        "judge/concept",
        "eval/clip_i",
        "metrics/clip_i",
        "val/loss",
    ]
    assert evidence_order([]) == ["eval/clip_i", "metrics/clip_i", "val/loss"]
    runs = [{"run_dir": str(i), "status": "completed", "method": m, "seed": i, "final_loss": loss,
             "metrics/clip_i": clip, "eval/clip_i": full, "val/loss": val}
            for i, (m, loss, clip, full, val) in enumerate([("ti", 0.1, 0.5, 0.3, 0.2), ("lora", 0.05, 0.2, 0.6, 0.3)])]  # fmt: skip
    from conceptlab.report import Sweep

    frame = pd.DataFrame(runs)
    sweep = Sweep(root=tmp_path, runs=frame, axes=["method", "seed"], evidence=["metrics/clip_i"])
    assert headline(sweep).metric == "eval/clip_i"  # evaluate.py's full protocol before training's subset
    assert list(headline(sweep).table["method"]) == ["lora", "ti"]
    sweep.runs = frame.drop(columns=["eval/clip_i"])
    assert headline(sweep).metric == "metrics/clip_i" and headline(sweep).note == ""
    sweep.runs = frame.drop(columns=["eval/clip_i", "metrics/clip_i"])
    answer = headline(sweep)  # nothing scored samples: the held-out loss (lower is better), no caveat
    assert (
        answer.metric == "val/loss" and answer.note == "" and list(answer.table["method"]) == ["ti", "lora"]
    )
    sweep.runs = frame.drop(columns=["eval/clip_i", "metrics/clip_i", "val/loss"])
    answer = headline(sweep)
    assert answer.metric == "final_loss" and answer.note == LOSS_CAVEAT
    sweep.study = {"metric": "study/tv"}  # a study's own metric the runs lack: said, then the same chain
    answer = headline(sweep)
    assert (
        answer.note.startswith("The study's metric study/tv is not in these runs' records")
        and LOSS_CAVEAT in answer.note
    )


def test_where_only_the_loss_exists_the_page_and_the_console_say_it_compares_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    for num, method in enumerate(["ti", "lora"]):
        write_run(sweep, num, method, 0, final_loss=0.1 - num / 20, scores={}, evaluators=())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # what scripts/report.py prints
        assert main([str(sweep)]) == 0
    assert "best by final_loss: method=lora" in printed.getvalue()
    assert "note: No evaluator scored these runs" in printed.getvalue()
    assert "it does not compare methods" in (sweep / "report" / "report.html").read_text()


def test_a_runs_best_step_is_chosen_by_the_judge_where_it_scores():
    from types import SimpleNamespace

    from conceptlab.evaluate import MetricEvaluation

    evaluation = object.__new__(MetricEvaluation)
    summary = SimpleNamespace(
        metrics={"step": 100, "judge/concept": 0.5}, evidence=["judge/concept", "metrics/clip_i"]
    )
    evaluation.record, evaluation.best = SimpleNamespace(summary=summary), {}
    evaluation.cfg = SimpleNamespace(best=None)
    assert evaluation.best_metric(100, {"metrics/clip_i": 0.9}) == ("judge/concept", 0.5)
    # no judge at this step (or on this model): CLIP-I
    assert evaluation.best_metric(200, {"metrics/clip_i": 0.9}) == ("metrics/clip_i", 0.9)
    evaluation.cfg = SimpleNamespace(best="metrics/clip_i")  # evaluate.best names it: that one
    assert evaluation.best_metric(100, {"metrics/clip_i": 0.9}) == ("metrics/clip_i", 0.9)


def test_loss_curves_are_smoothed_as_the_recurrence_says():
    values = pd.Series([1.0, 0.0, 1.0, 0.0, 1.0])
    ema = smoothed(values, 0.9)
    # debiased exponential moving average: m_t = 0.9 m_{t-1} + 0.1 x_t, divided by 1 - 0.9^(t+1)
    raw, expected = 0.0, []
    for t, x in enumerate(values):
        raw = 0.9 * raw + 0.1 * x
        expected.append(raw / (1 - 0.9 ** (t + 1)))
    assert ema.tolist() == pytest.approx(expected)
    assert ema.iloc[0] == 1.0 and ema.std() < values.std() / 2


def test_the_report_draws_curves_with_seed_bands_and_the_runs_table_once_per_column(
    ti_beats_lora_by_the_judge,
):
    folder, _ = ti_beats_lora_by_the_judge
    assert collect(folder).evidence == ["judge/concept", "metrics/clip_i"]
    out = folder / "report"
    for plot in ("loss_curves.png", "curves_judge_concept.png", "curves_metrics_clip_i.png"):
        assert Image.open(out / "plots" / plot).size[0] > 500, plot
    page = (out / "report.html").read_text()
    table = re.search(r"<table class=sortable><tr>(.*?)</tr>", page).group(1)
    heads = re.findall(r"<th>(.*?)</th>", table)
    assert len(heads) == len(set(heads)) and heads.count("method") == 1
    assert "<a href='../0_ti/'>0_ti</a> · <a href='samples/ti-seed0_0_ti.png'>last grid</a>" in page


def test_every_grid_shows_readable_cells_with_labels():
    tiny = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green", "white")]
    assert readable(tiny[0]).size == (128, 128) and readable(Image.new("RGB", (512, 512))).size == (512, 512)
    grid = labelled_grid(
        tiny, ["a photo of a large red circle on a white background", "a photo"], ["seed 0", "seed 1"]
    )
    left = grid.width - 2 * MIN_CELL
    assert grid.height >= 2 * MIN_CELL + 14 and 100 < left < 400  # wrapped prompt labels on the left
    cell = grid.crop((left, grid.height - MIN_CELL, left + MIN_CELL, grid.height))
    assert cell.getcolors() == [(MIN_CELL * MIN_CELL, (0, 128, 0))]  # nearest neighbour: one colour, no blur
    png = grid_png(torch.rand(4, 3, 32, 32), ["a photo of {}", "{} on a beach"], [0, 1])
    from io import BytesIO

    assert Image.open(BytesIO(png)).height >= 2 * MIN_CELL


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None and not __import__("os").environ.get("CI"), reason="no chromium")
def test_a_browser_reads_the_answer_and_the_side_by_side_sheet(ti_beats_lora_by_the_judge):
    page = ti_beats_lora_by_the_judge[0] / "report" / "report.html"
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    answer = re.search(r"<h2>Answer</h2>.*?<b>(.*?)</b>", dom, re.S).group(1)
    assert answer == "Best setting by judge/concept (higher is better): method=ti"
    sheet = re.search(r'<table class="sheet">(.*?)</table>', dom, re.S).group(1)
    assert re.findall(r"<th>(\w+)</th>", sheet) == ["ti", "lora"] and sheet.count("<img") == 2
    assert 'data-broken="0"' in dom


@pytest.mark.slow
def test_wandb_holds_the_defined_summaries_captioned_readable_grids_and_the_sweeps_table(
    tmp_path, tiny_encoders
):
    from conftest import sweep, wandb_records, wandb_values

    overrides = ["evaluators=metrics", f"encoders.clip={tiny_encoders['clip']}", f"encoders.dino={tiny_encoders['dino']}",
                 "evaluate.every_n_steps=2", "logger=wandb", "method=hypernet"]  # fmt: skip
    proc, folder = sweep(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    group = f"sweep-{folder.name}"  # an ad-hoc sweep's jobs are grouped by the sweep
    for job, method in (("0_hypernet", "hypernet"),):  # a sweep of one job: what a job's W&B run holds
        [run] = list((folder / job / "wandb").glob("offline-run-*"))
        records = wandb_records(run)
        [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
        assert (info.run_group, info.job_type) == (group, method)
        defined = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
        assert defined["metrics/clip_i"].summary.max and defined["metrics/clip_i"].summary.last
        assert defined["metrics/clip_i"].step_metric == "trainer/global_step"
        assert defined["train/loss"].summary.min and defined["train/loss"].summary.last
        summary = wandb_values(records, "summary")
        assert set(summary["metrics/clip_i"]) >= {"max", "last"}
        history = wandb_values(records, "history")
        [caption] = history["samples/captions"]
        word = "<robot>" if method == "ti" else "robot"  # a hypernetwork's prompts name it as A1111 does
        assert caption == f"rows: a photo of {word} | a photo of {word} on a beach; columns: seeds 0"
        assert history["samples/height"] >= 2 * MIN_CELL  # two prompts, each image at least MIN_CELL px
        assert history["metrics/per_prompt/_type"] == "table-file"
    [table_run] = list((folder / "wandb").glob("offline-run-*"))
    records = wandb_records(table_run)
    [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert (info.run_group, info.job_type) == (group, "sweep")
    assert wandb_values(records, "history")["sweep/answer/_type"] == "table-file"


def tmux_screen(tmp_path, command: list[str], name: str) -> list[str]:
    """`command` run in a 160-column pseudo-terminal (tmux) until it ends: the screen's lines as a person
    sees them, scrollback included (bars redrawn in place count once, as they look)."""
    import os
    import shlex
    import shutil
    import time

    if shutil.which("tmux") is None:
        assert not os.environ.get("CI"), "CI installs tmux (.ci/run); it is missing"
        pytest.skip("no tmux (apt install tmux)")
    session = f"conceptlab-{name}-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no W&B credentials: the sweep logs offline and says so
    script = f"cd {shlex.quote(str(tmp_path))} && {shlex.join(command)}; echo CONCEPTLAB-DONE"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", "bash", "-c",
                    f"{script}; sleep 600"], env=env, check=True)  # fmt: skip
    try:
        for _ in range(300):
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-2000"],
                                    capture_output=True, text=True).stdout  # fmt: skip
            if "CONCEPTLAB-DONE" in screen:
                return [line for line in screen.splitlines() if line.strip()]
            time.sleep(2)
        raise AssertionError(f"{command} did not end in 10 minutes:\n{screen}")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


BAR = re.compile(r"\d+%\|")  # a tqdm bar: "100%|████|"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["packed", "basic"])
def test_a_sweeps_console_says_each_thing_once_with_no_two_things_on_a_line(tmp_path, launcher):
    from conftest import FAST

    (tmp_path / "home").mkdir()
    args = [a for a in FAST if a != "trainer.enable_progress_bar=false"]
    screen = tmux_screen(tmp_path, [sys.executable, str(ROOT / "train.py"), "-m", *args, "method=ti,hypernet",
                                    f"hydra/launcher={launcher}", "logger=wandb", "output_root=out"], launcher)  # fmt: skip
    text = "\n".join(screen)
    assert sum("W&B: no credentials" in line for line in screen) == 1, text  # once per sweep, not per job
    finished = [line for line in screen if re.match(r"\[\d+_\w+\] \S+: completed", line)]
    assert len(finished) == 2, text  # one line per finished job
    for line in screen:
        assert len(BAR.findall(line)) <= 1, line  # never two bars on one line
        if BAR.search(line):
            assert "completed" not in line and "[HYDRA]" not in line and "conceptlab:" not in line, line
    bars = [line for line in screen if BAR.search(line)]
    if launcher == "packed":  # the pack's one bar over every job's steps; the jobs draw none of their own
        assert bars and all(line.startswith("pack of 2 jobs: 100%") for line in bars), text
    else:
        assert len(bars) == 2 and all(line.startswith("training: 100%") for line in bars), text


def test_a_runs_row_carries_its_cost_parameters_file_size_and_memory(tmp_path):
    from conceptlab.report import read_run

    run = tmp_path / "0_lora"
    (run / "concepts" / "steps").mkdir(parents=True)
    (run / "concepts" / "robot.safetensors").write_bytes(b"\0" * 3 * 2**20)
    (run / "concepts" / "robot.pt").write_bytes(b"\0" * 2**20)
    summary = {"status": "completed", "method": "lora", "seed": 0, "trainable_params": 1234, "swept": {"method": "loha"},
               "peak_memory_mb": {"host": 900.5, "cuda": 300.0},
               "files": {"concepts": ["concepts/robot.pt", "concepts/robot.safetensors", "concepts/diffusers/x.safetensors"]}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    row = read_run(run, tmp_path)
    assert row["method"] == "loha"  # the swept option, not the class's name
    assert row["trainable_params"] == 1234 and row["file_mb"] == 3.0
    assert row["peak_host_mb"] == 900.5 and row["peak_cuda_mb"] == 300.0
