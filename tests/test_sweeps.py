"""Named experiments, multirun sweeps and the comparison report over them."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, compose, run_train, sweep
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType

from conceptlab.errors import ConfigError
from conceptlab.report import collect, write_report
from conceptlab.runfolder import find_run_dirs
from conceptlab.sweeps import flatten, run_name

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def sweep_params(experiment: str) -> dict[str, list[str]]:
    cfg = compose([f"+experiment={experiment}"], with_hydra=True)
    params = cfg.hydra.sweeper.params or {}
    parser = OverridesParser.create()
    found = {}
    for key, value in params.items():
        [override] = parser.parse_overrides([f"{key}={value}"])
        if override.value_type == ValueType.INTERVAL_SWEEP:  # a search's range: its two ends
            interval = override.value()
            found[key] = [str(interval.start), str(interval.end)]
        elif "optuna" in str(cfg.hydra.sweeper._target_).lower():  # a search's choices, as Optuna writes them
            found[key] = [str(choice) for choice in override.value().list]
        else:
            found[key] = list(override.sweep_string_iterator())
    return found


def test_the_studies_the_framework_answers_are_there():
    assert set(EXPERIMENTS) >= {
        "ti_vs_hypernet", "ti_num_vectors", "ti_lr", "hypernet_lr", "num_images", "templates", "hypernet_structure",
    }  # fmt: skip


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_names_its_study_and_sweeps_valid_values(experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.study.name == experiment and cfg.study.metric and cfg.study.question
    params = sweep_params(experiment)
    assert params, f"{experiment} sweeps nothing"
    # Every swept value composes (the key exists and the value has its type): the i-th value of every key
    # together, so a sweep of n values per key composes n times, not once per value.
    for i in range(max(len(values) for values in params.values())):
        chosen = [f"{key}={values[i % len(values)]}" for key, values in params.items()]
        try:
            compose([f"+experiment={experiment}", *chosen])
        except Exception as err:
            raise AssertionError(f"{experiment}: {chosen} do not compose: {err}") from err


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_a_job(tmp_path, experiment):
    """One job of each study, with each swept key at its first value, trains end to end."""
    first = [f"{k}={v[0]}" for k, v in sweep_params(experiment).items()]
    summary = run_train(tmp_path / "run", f"+experiment={experiment}", *first, "samples.every_n_steps=0")
    assert summary["status"] == "completed"


def test_unknown_experiment_lists_the_available_ones(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=nope", f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "ti_vs_hypernet" in proc.stderr


def test_a_swept_key_that_does_not_exist_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "method.num_vectorz=1,2", f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0 and "num_vectorz" in proc.stderr
    assert not list(tmp_path.glob("**/summary.json"))


def test_run_names_read_like_the_sweep():
    assert (
        run_name("hypernet", "ink", 2, {"method": "hypernet", "method.lr": "1e-5", "seed": "2"})
        == "hypernet-lr1e-5-seed2"
    )
    assert run_name("ti", "robot", 0, {"data": "styles", "seed": "0"}) == "ti-styles-seed0"
    assert run_name("ti", "robot", 0, {}) == "ti-robot-seed0"
    assert flatten({"method": {"lr": 1, "name": "ti"}, "seed": 0}) == {
        "method.lr": 1,
        "method.name": "ti",
        "seed": 0,
    }


@pytest.mark.slow
def test_four_job_sweep_then_the_report(tmp_path):
    proc, folder = sweep(tmp_path, "method=ti,hypernet", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One line per finished job, then the table of all jobs and the report command.
    finished = [
        line for line in proc.stdout.splitlines() if re.match(r"\[\d_\w+\] \S+-seed\d: completed", line)
    ]
    assert len(finished) == 4, proc.stdout
    assert "sweep: 4 jobs in" in proc.stdout and f"report: conceptlab-report {folder}" in proc.stdout
    # model=tiny has no evaluator: the loss stands in for the answer, and the console says it compares nothing
    assert re.search(r"^best by final_loss: method=\w+ \(", proc.stdout, re.M)
    assert "note: No evaluator scored these runs" in proc.stdout and "does not compare methods" in proc.stdout
    summaries = [json.loads(p.read_text()) for p in sorted(folder.glob("*/summary.json"))]
    assert [s["status"] for s in summaries] == ["completed"] * 4
    assert sorted(s["run_name"] for s in summaries) == [
        "hypernet-robot-seed0", "hypernet-robot-seed1", "ti-robot-seed0", "ti-robot-seed1",
    ]  # fmt: skip
    assert all(s["swept"].keys() == {"method", "seed"} for s in summaries)
    assert all(s["time_to_first_step_s"] is not None for s in summaries)

    report = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(folder)], capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    out = folder / "report"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 4
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("hypernet", "0"),
        ("hypernet", "1"),
        ("ti", "0"),
        ("ti", "1"),
    ]
    assert all(r["status"] == "completed" and float(r["final_loss"]) > 0 for r in rows)
    page = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert "plots/loss_curves.png" in images and "plots/methods.png" in images
    # a sample grid per run, and the side-by-side sheet's first run of each method (ti, hypernet)
    assert sum(src.startswith("samples/") for src in images) == 4 + 2
    assert all((out / src).is_file() for src in images)


@pytest.mark.slow
def test_report_shows_failed_and_missing_jobs(tmp_path):
    proc, folder = sweep(
        tmp_path, f"data.path={tmp_path / 'nope'},bundled:robot,bundled:ink", "samples.every_n_steps=0"
    )
    assert proc.returncode == 1  # the sweep ran its other jobs, then reported the failure
    # one line for the failed job and one at the end; no traceback of a user's mistake
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert f"error: image folder {tmp_path / 'nope'} does not exist" in proc.stderr
    assert re.search(r"^sweep: 1 of 3 jobs did not complete \(0_ti\)", proc.stderr, re.M)
    jobs = find_run_dirs(folder)
    shutil.rmtree(jobs[-1])  # as if the last job had not started yet
    result = collect(folder)
    statuses = dict(zip(result.runs["run_dir"], result.runs["status"]))
    assert statuses == {jobs[0].name: "failed", jobs[1].name: "completed", "job 2": "not started"}
    assert "does not exist" in result.runs.set_index("run_dir").loc[jobs[0].name, "error"]
    page = write_report(result, tmp_path / "report").read_text()
    assert "failed" in page and "not started" in page


def test_report_on_a_folder_without_runs_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no run records under"):
        collect(tmp_path)


@pytest.mark.slow
def test_ddp_jobs_inside_a_local_sweep_do_not_start_new_sweeps(tmp_path):
    """Lightning's ddp would re-run `train.py -m ...` for rank 1; inside a sweep a job uses ddp_spawn."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    proc, folder = sweep(
        tmp_path, *ddp, "seed=1", "trainer.max_steps=3", "samples.every_n_steps=0", "evaluate.enabled=false"
    )  # a one-job sweep: the same launcher
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "multirun").iterdir())) == 1, "a rank started a sweep of its own"
    summaries = [json.loads(p.read_text()) for p in sorted(folder.glob("*/summary.json"))]
    assert len(summaries) == 1
    for summary in summaries:
        assert summary["status"] == "completed" and summary["steps"] == 3 and summary["final_loss"] > 0
        assert summary["global_batch_size"] == 2 * 2  # data.batch_size x devices
        assert summary["files"]["concepts"] == ["concepts/robot.pt", "concepts/robot.safetensors"]


@pytest.mark.slow
def test_every_sweep_job_is_its_own_wandb_run_with_a_flat_config(tmp_path):
    # WANDB_MODE= (empty, as CI systems and .env files leave it) counts as unset: offline without credentials
    env = {"WANDB_MODE": "", "WANDB_API_KEY": None, "HOME": str(tmp_path)}
    proc, folder = sweep(tmp_path, "method=ti,hypernet", "logger=wandb", "samples.every_n_steps=0", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("W&B: no credentials") == 1  # the sweep decided the mode once, for its jobs
    runs = sorted(folder.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 2
    for job in find_run_dirs(folder):
        run_id = (job / "wandb_run_id").read_text()
        [run] = list(job.glob("wandb/offline-run-*"))
        assert run.name.endswith(run_id)
        record = (run / f"run-{run_id}.wandb").read_bytes()  # offline runs keep their config in here
        assert b"method.name" in record and b"data.batch_size" in record  # flattened keys


def test_more_devices_than_the_machine_has_is_a_clear_error(tmp_path):
    from conceptlab.errors import ConceptLabError

    with pytest.raises(ConceptLabError, match="trainer:"):
        run_train(tmp_path / "run", "trainer.accelerator=gpu", "trainer.devices=4")


def fake_sweep(tmp_path, metric, rows, goal=None):
    import pandas as pd

    from conceptlab.report import Sweep

    study = {"name": "s", "question": "which?", "metric": metric, "goal": goal}
    return Sweep(root=tmp_path, runs=pd.DataFrame(rows), axes=["method", "seed"], study=study)


def test_the_study_metric_drives_the_headline_table_and_best_run(tmp_path):
    from conceptlab.report import headline, write_report

    rows = [
        {"run_dir": f"{i}", "status": "completed", "run_name": f"{m}-seed{s}", "method": m, "seed": s,
         "concept": "robot", "judge/concept": v, "final_loss": 0.1}
        for i, (m, s, v) in enumerate([("ti", 0, 0.9), ("ti", 1, 0.7), ("hypernet", 0, 0.4), ("hypernet", 1, 0.95)])
    ] + [{"run_dir": "4", "status": "failed", "method": "lora", "seed": 0}]  # fmt: skip
    answer = headline(fake_sweep(tmp_path, "judge/concept", rows))
    assert answer.metric == "judge/concept" and answer.goal == "max" and not answer.note
    assert list(answer.table["method"]) == ["ti", "hypernet"]  # best mean first; failed runs left out
    assert answer.table["mean"].tolist() == [0.8, 0.675] and answer.table["count"].tolist() == [2, 2]
    assert answer.best_run["run_name"] == "hypernet-seed1"  # the best single run
    page = write_report(fake_sweep(tmp_path, "judge/concept", rows), tmp_path / "report").read_text()
    assert page.index("<h2>Answer</h2>") < page.index("<h2>Runs</h2>")
    assert "Best setting by judge/concept (higher is better): method=ti" in page


def test_a_study_metric_the_runs_lack_falls_back_to_the_loss_and_says_so(tmp_path):
    from conceptlab.report import headline

    rows = [
        {"run_dir": "0", "status": "completed", "method": "ti", "concept": "a", "seed": 0, "final_loss": 0.3},
        {
            "run_dir": "1",
            "status": "completed",
            "method": "hypernet",
            "concept": "a",
            "seed": 0,
            "final_loss": 0.2,
        },
    ]
    answer = headline(fake_sweep(tmp_path, "judge/concept", rows))
    assert answer.metric == "final_loss" and answer.goal == "min" and "judge/concept" in answer.note
    assert list(answer.table["method"]) == ["hypernet", "ti"]
    assert headline(fake_sweep(tmp_path, "train/loss", rows)).note == ""  # train/loss is final_loss


def test_the_report_survives_bad_records(tmp_path, capsys):
    """A corrupt or missing summary/metrics file makes that run "unreadable (file, reason)", never no report."""
    from conceptlab.report import main

    good = tmp_path / "one" / "run"
    run_train(good, "samples.every_n_steps=0")
    (good / ".hydra" / "config.yaml").write_text("study:\n  name: bad-records\n")  # as Hydra leaves it
    folder = tmp_path / "sweep"
    for job in range(5):
        shutil.copytree(good, folder / str(job))
    (folder / "1" / "summary.json").write_text('{"status": "compl')  # cut off mid-write
    (folder / "2" / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage,\n\x00\x00")
    (folder / "3" / "summary.json").write_text("[]")
    (folder / "4" / "summary.json").write_text('{"status": "completed", "swept": 7, "metrics": "high"}')
    (folder / "0" / ".hydra" / "config.yaml").write_text("study: [unclosed")
    assert main([str(folder), "--out", str(tmp_path / "report")]) == 0
    runs = collect(folder).runs.set_index("run_dir")
    assert runs.loc["0", "status"] == runs.loc["2", "status"] == "completed"
    assert runs.loc["1", "status"] == runs.loc["3", "status"] == runs.loc["4", "status"] == "unreadable"
    assert runs.loc["1", "error"].startswith("summary.json: JSONDecodeError")
    assert runs.loc["3", "error"] == "summary.json: not a JSON object (list)"
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("unreadable") >= 3 and "summary.json: JSONDecodeError" in page
    assert "(5 runs: 3 unreadable, 2 completed)" in capsys.readouterr().out


def similarity_rows():
    """Two methods x three seeds with evaluate.py's metrics under DreamBooth's protocol, and judge scores."""
    rows = []
    for i, (method, seed, recon, clip_i, clip_t, dino, concept) in enumerate([
        ("ti", 0, 0.80, 0.78, 0.25, 0.55, 0.6), ("ti", 1, 0.84, 0.80, 0.22, 0.58, 0.8), ("ti", 2, 0.78, 0.76, 0.27, 0.52, 0.5),
        ("hypernet", 0, 0.70, 0.70, 0.30, 0.45, 0.2), ("hypernet", 1, 0.74, 0.72, 0.29, 0.47, 0.4),
        ("hypernet", 2, 0.72, 0.71, 0.31, 0.46, 0.3),
    ]):  # fmt: skip
        rows.append({
            "run_dir": str(i), "status": "completed", "run_name": f"{method}-seed{seed}", "method": method,
            "seed": seed, "concept": "dog", "final_loss": 0.1, "judge/concept": concept, "eval/recon_clip_i": recon,
            "eval/clip_i": clip_i, "eval/clip_t": clip_t, "eval/dino": dino, "eval_protocol": "dreambooth",
        })  # fmt: skip
    return rows


def test_the_report_tables_the_similarity_metrics_beside_the_published_ones(tmp_path):
    from conceptlab.report import pareto_front, similarity_table, write_report
    from conceptlab.toyworld.sections import metric_agreement

    sweep = fake_sweep(tmp_path, "eval/clip_i", similarity_rows())
    table, prefix = similarity_table(sweep)
    assert prefix == "eval/" and list(table["method"]) == ["ti", "hypernet"]
    ti = table.iloc[0]
    assert ti["clip_i"] == pytest.approx(0.78) and ti["clip_t"] == pytest.approx(0.2467, abs=1e-4)
    assert ti["clip_i_sd"] == pytest.approx(0.02) and ti["runs"] == 3
    assert pareto_front([(0.8, 0.25), (0.84, 0.22), (0.78, 0.27), (0.77, 0.2)]) == [
        (0.78, 0.27),
        (0.8, 0.25),
        (0.84, 0.22),
    ]
    [(column, truth, rho, n)] = metric_agreement(sweep.runs)[:1]
    assert (column, truth, n) == ("eval/clip_i", "judge/concept", 6) and rho > 0.8
    page = write_report(sweep, tmp_path / "report").read_text()
    assert "Textual Inversion, Stable Diffusion (published)</td><td>0.569</td><td>0.780</td><td>0.255" in page
    # the judge's own section (its runs plug it in) says how far each metric agrees with its truth
    assert "agree with the judge" not in page
    sweep.targets = ["conceptlab.toyworld.evaluate.JudgeEvaluation"]
    page = write_report(sweep, tmp_path / "report").read_text()
    assert "<code>eval/clip_i</code> vs <code>judge/concept</code>: Spearman ρ = " in page
    assert "<td>ti</td><td>0.550 ± 0.030</td><td>0.780 ± 0.020</td>" in page
    assert (tmp_path / "report" / "plots" / "reconstruction_vs_editability.png").is_file()
    # on SD weights there is no judge: the headline takes CLIP-I from evaluate.py instead of the loss
    from conceptlab.report import headline

    no_judge = [{k: v for k, v in r.items() if k != "judge/concept"} for r in similarity_rows()]
    answer = headline(fake_sweep(tmp_path, "judge/concept", no_judge))
    assert answer.metric == "eval/clip_i" and list(answer.table["method"]) == ["ti", "hypernet"]
    assert "eval/clip_i (CLIP-I) stands in" in answer.note
    # another protocol: no published rows beside it
    other = [{**r, "eval_protocol": "toy"} for r in similarity_rows()]
    assert (
        "(published)"
        not in write_report(fake_sweep(tmp_path, "eval/clip_i", other), tmp_path / "r2").read_text()
    )


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"), reason="no chromium (apt install chromium)"
)
def test_report_html_renders_in_a_real_browser(tmp_path):
    """Headless Chromium loads report.html: every image present, the page's script ran (no errors)."""
    import re

    from conceptlab.report import write_report

    assert chromium(), "CI installs chromium (.ci/run); it is missing"
    out = tmp_path / "report"
    page = write_report(fake_sweep(tmp_path, "eval/clip_i", similarity_rows()), out)

    def render() -> str:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    dom = render()
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images >= 3 and 'data-broken="0"' in dom
    # the check itself works: a missing plot is counted and named on the page
    (out / "plots" / "reconstruction_vs_editability.png").unlink()
    dom = render()
    assert 'data-broken="1"' in dom and "Missing images: plots/reconstruction_vs_editability.png" in dom


def test_the_headline_names_each_methods_best_setting(tmp_path):
    from conceptlab.report import write_report

    rows = [
        {"run_dir": f"{i}", "status": "completed", "method": m, "seed": 0, "lr": lr, "concept": "c", "judge/concept": v}
        for i, (m, lr, v) in enumerate([("ti", 0.1, 0.5), ("ti", 0.01, 0.7), ("hypernet", 0.1, 0.6), ("hypernet", 0.01, 0.2)])
    ]  # fmt: skip
    sweep = fake_sweep(tmp_path, "judge/concept", rows)
    sweep.axes = ["method", "lr", "seed"]
    page = write_report(sweep, tmp_path / "report").read_text()
    assert "<li>ti: lr=0.01 — 0.7 (1 runs)</li><li>hypernet: lr=0.1 — 0.6 (1 runs)</li>" in page


def test_expected_jobs_count_a_command_line_value_instead_of_the_experiments_sweep(tmp_path):
    from conceptlab.report import expected_job_count

    record = {"hydra": {"overrides": {"task": ["+experiment=composition", "method=ti", "data=a,b"]},
                        "sweeper": {"params": {"method": "ti,hypernet", "data": "x,y,z", "seed": "0,1,2"}}}}  # fmt: skip
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(record))
    assert expected_job_count(tmp_path) == 1 * 2 * 3  # method pinned, data swept on the command line, 3 seeds


@pytest.mark.slow
def test_a_search_runs_its_trials_through_train_py_and_the_report_reads_it(tmp_path):
    """hydra/sweeper=optuna: each trial is a run whose task returns its metric to Optuna; the sweep's record,
    job count, swept keys and report read the search like any sweep."""
    args = ["+experiment=search_ti", "hydra.sweeper.n_trials=3", "study.metric=final_loss", "study.goal=min",
            "hydra.sweeper.direction=minimize", "samples.every_n_steps=0"]  # fmt: skip
    proc, folder = sweep(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((d / "summary.json").read_text()) for d in find_run_dirs(folder)]
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    assert all(set(s["swept"]) == {"method.lr", "method.num_vectors"} for s in summaries)
    assert len({s["swept"]["method.lr"] for s in summaries}) == 3  # each trial its own setting
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(s["final_loss"] for s in summaries)  # the values train.py returned
    assert "sweep: 3 jobs in" in proc.stdout and proc.stdout.count("sweep: ") == 1  # ended once, at the end
    runs = collect(folder).runs
    assert len(runs) == 3 and "method.lr" in runs.columns


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["model=tiny"],
            r"^error: study\.metric=judge/concept: no evaluator scores these runs .* study\.metric=final_loss",
        ),
        (
            ["study.goal=min"],
            r"^error: hydra\.sweeper\.direction=maximize: .* set hydra\.sweeper\.direction=minimize",
        ),
    ],
)
def test_a_search_that_cannot_optimize_its_metric_is_one_line_before_any_trial(tmp_path, args, said):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=search_ti", *args, f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2 and re.search(said, proc.stderr.strip()), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "multirun").exists()


def test_a_group_the_sweep_adds_is_a_swept_key_by_its_name(tmp_path):
    """`+knob: none,ema` in an experiment's params (a config group the sweep adds) is the swept key `knob`."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from conceptlab.sweeps import swept_values

    hydra_cfg = OmegaConf.create({
        "mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)},
        "sweeper": {"params": {"+knob": "none,ema", "seed": "0,1"}},
        "overrides": {"task": ["+knob=ema", "seed=1", "model=tiny"]},
    })  # fmt: skip
    assert swept_values(hydra_cfg) == {"knob": "ema", "seed": "1"}
    assert run_name("ti", "robot", 1, swept_values(hydra_cfg)) == "ti-ema-seed1"
