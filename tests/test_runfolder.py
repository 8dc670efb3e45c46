"""A run folder across the runs that use it: one at a time, one configuration, a history that grows."""

from __future__ import annotations

import csv
import signal

import pytest
from conftest import read_summary, run_train, start_long_run, train_subprocess

from conceptlab.errors import ConfigError


def metric_rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_rerun_appends_to_metrics_csv_replacing_only_rows_from_the_resumed_step_on(tmp_path):
    run_dir = tmp_path / "job"
    run_train(run_dir, "trainer.max_steps=2", "samples.every_n_steps=0")
    first = metric_rows(run_dir)
    first_losses = {int(r["step"]): r["train/loss"] for r in first if r["train/loss"]}
    assert sorted(first_losses) == [0, 1]
    # Rows a killed run logged after its last checkpoint: the rerun logs those steps again.
    with open(run_dir / "metrics.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(first[0])).writerow({**first[0], "step": 2, "train/loss": 123.0})
    run_train(run_dir, "trainer.max_steps=4", "samples.every_n_steps=0")
    rows = metric_rows(run_dir)
    losses = {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}
    assert sorted(losses) == [0, 1, 2, 3]
    assert losses[0] == first_losses[0] and losses[1] == first_losses[1]  # the first run's rows, kept
    assert "123.0" not in losses.values()
    assert not (run_dir / "metrics.csv.previous").exists()


def test_a_fixed_folder_with_another_configurations_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "job"
    run_train(run_dir, "trainer.max_steps=2", "samples.every_n_steps=0")
    record, hydra_record = (run_dir / "summary.json").read_bytes(), (run_dir / ".hydra").glob("*.yaml")
    hydra_record = {p.name: p.read_bytes() for p in hydra_record}
    with pytest.raises(ConfigError, match=r"holds the checkpoint of another configuration \(seed: 0 -> 1\)"):
        run_train(run_dir, "trainer.max_steps=4", "samples.every_n_steps=0", "seed=1")
    # the refused run wrote nothing there: the folder's record and Hydra's record are its run's
    assert (run_dir / "summary.json").read_bytes() == record
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")} == hydra_record
    assert "seed=1" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    # A longer budget is the same configuration: it continues.
    assert run_train(run_dir, "trainer.max_steps=3", "samples.every_n_steps=0")["steps_this_process"] == 1


def test_stray_temporary_files_are_cleaned_at_start(tmp_path):
    run_dir = tmp_path / "job"
    (run_dir / "checkpoints").mkdir(parents=True)
    stray = run_dir / "checkpoints" / ".last.ckpt.0123456789ab.tmp"
    stray.write_bytes(b"half a checkpoint")
    kept = run_dir / ".notes.tmp"  # not one of ours
    kept.write_text("mine")
    run_train(run_dir, "samples.every_n_steps=0")
    assert not stray.exists() and kept.exists()


@pytest.mark.slow
def test_a_running_run_holds_its_folder_and_sigterm_records_interrupted(tmp_path):
    proc = start_long_run(tmp_path, rows=5)
    try:
        [run_dir] = list(tmp_path.glob("runs/*"))
        second, _ = train_subprocess(tmp_path / "second", f"hydra.run.dir={run_dir}", "trainer.max_steps=2")
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"error: run folder {run_dir} is in use by pid {proc.pid} on ")
        assert read_summary(run_dir)["status"] == "running"  # the holder's record is untouched
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()  # and so is Hydra's record of it
        assert "trainer.max_steps=100000" in overrides and "trainer.max_steps=2" not in overrides
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted"


def test_a_full_disk_records_failed_with_the_reason(tmp_path, monkeypatch):
    import errno

    import conceptlab.atomic

    real = conceptlab.atomic.atomic_path

    def full(target):
        if str(target).endswith((".safetensors", ".pt")):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(target)

    monkeypatch.setattr(conceptlab.atomic, "atomic_path", full)
    import conceptlab.formats

    monkeypatch.setattr(conceptlab.formats, "atomic_path", full)
    with pytest.raises(OSError, match="No space left"):
        run_train(tmp_path / "run", "samples.every_n_steps=0", "checkpoint.every_n_steps=0")
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]


@pytest.mark.slow
@pytest.mark.parametrize("kept_space_helps", [True, False])
def test_a_disk_that_fills_during_training_still_takes_the_record_or_the_console_says_why(
    tmp_path, monkeypatch, capsys, kept_space_helps
):
    """The disk fills at the first concept file: the space kept for the record's last write
    (.conceptlab.reserve) is what the failure record gets; where even that is not enough, the console
    names the run, how it ended and why."""
    import errno

    import conceptlab.atomic
    import conceptlab.formats

    real, run_dir, filled = conceptlab.atomic.atomic_path, tmp_path / "run", []

    def full(target):
        if str(target).endswith((".safetensors", ".pt")):
            filled.append(target)  # the disk is full from here on
        reserve_freed = not (run_dir / ".conceptlab.reserve").exists()
        if filled and not (kept_space_helps and reserve_freed and target.name == "summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(target)

    for module in (conceptlab.atomic, conceptlab.formats):
        monkeypatch.setattr(module, "atomic_path", full)
    with pytest.raises(OSError, match="No space left"):
        run_train(run_dir, "samples.every_n_steps=0", "checkpoint.every_n_steps=0")
    summary = read_summary(run_dir)
    assert not (run_dir / ".conceptlab.reserve").exists()
    said = capsys.readouterr().err
    if kept_space_helps:
        assert summary["status"] == "failed" and "No space left on device" in summary["error"]
        assert "could not be written" not in said
    else:
        assert summary["status"] == "running"  # the last record that could be written
        assert f"error: the run in {run_dir} failed: OSError: [Errno 28] No space left on device" in said
        assert "its record" in said and "could not be written (No space left on device)" in said


def test_ctrl_c_records_interrupted_and_stops(tmp_path, monkeypatch):
    """SIGINT is Python's KeyboardInterrupt, which Lightning turns into SystemExit(1) after stopping: the
    run records `interrupted` and the process exits non-zero."""
    import conceptlab.module

    real = conceptlab.module.ConceptModule.training_step

    def interrupted_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    monkeypatch.setattr(conceptlab.module.ConceptModule, "training_step", interrupted_at_step_2)
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path / "run", "samples.every_n_steps=0", "trainer.max_steps=10")
    assert stop.value.code not in (0, None)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "interrupted" and "SystemExit" in summary["error"]


def test_a_key_a_later_version_added_is_no_difference_but_a_changed_or_dropped_one_is():
    from conceptlab.runfolder import identity_differences

    saved = {"seed": 0, "optim": {"weight_decay": 0.01}, "method": {"lr": 0.001}}
    current = {
        "seed": 0,
        "optim": {"weight_decay": 0.01, "name": "adamw"},
        "method": {"lr": 0.001},
        "ema": {},
    }
    assert identity_differences(saved, current) == []  # optim.name is new: the saved run used its default
    current["method"]["lr"] = 0.002
    del current["optim"]["weight_decay"]
    assert identity_differences(saved, current) == [
        "method.lr: 0.001 -> 0.002",
        "optim.weight_decay: 0.01 -> (unset)",
    ]
