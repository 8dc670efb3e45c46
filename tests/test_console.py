"""The console a person reads: where the run is, how it went, what it learned, and no noise."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, train_subprocess

from conceptlab.console import NOISE

NOISE_PATTERNS = [re.compile(n.message) for n in NOISE] + [
    re.compile(r"wandb: WARNING The anonymous setting")
]


def noisy_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(p.search(line) for p in NOISE_PATTERNS)]


@pytest.mark.slow
def test_the_main_command_says_where_the_run_is_what_it_learned_and_how_to_use_it(tmp_path):
    proc, [run_dir] = train_subprocess(
        tmp_path, "trainer.max_steps=20", "evaluate.every_n_steps=10", "evaluate.num_samples=2",
        "samples.every_n_steps=0", "logger=wandb", fast=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    start = f"conceptlab: ti on toy_combo · model=toy · 20 steps · cpu · 32-true -> {run_dir}"
    assert start in out.splitlines()
    end = re.search(r"^conceptlab: completed in \d+ s · 20 steps · loss \(EMA\) (\d\.\d{4})$", out, re.M)
    # the progress bar's last figure is the summary's: one smoothed loss, named the same in both
    assert end and re.findall(r"loss \(EMA\) (\d\.\d{4})", proc.stderr)[-1] == end.group(1)
    scores = r"judge/concept {0} · judge/prompt {0} · metrics/clip_i {0} · metrics/clip_t {0}".format(
        r"-?\d\.\d\d -> -?\d\.\d\d"
    )
    assert re.search(rf"^  {scores}$", out, re.M)
    assert f"  run: {run_dir}" in out.splitlines()
    [files] = [line for line in out.splitlines() if line.startswith("  concept files: ")]
    listed = files.removeprefix("  concept files: ").split(", ")
    assert len(listed) == 2 and all(Path(f).is_file() for f in listed)
    [sync] = [line for line in out.splitlines() if line.startswith("  W&B (offline): wandb sync ")]
    assert Path(sync.rsplit(" ", 1)[-1]).is_dir()
    # the metrics' images reach W&B as a table per evaluation (steps 10 and 20 at least: never cached)
    tables = sorted(Path(sync.rsplit(" ", 1)[-1]).glob("files/media/table/metrics/images_*.table.json"))
    assert len(tables) >= 2 and json.loads(tables[0].read_text())["columns"] == [
        "step",
        "prompt",
        "seed",
        "image",
    ]
    assert not noisy_lines(out + proc.stderr), noisy_lines(out + proc.stderr)

    # The printed command works as typed.
    [use] = [line for line in out.splitlines() if line.startswith("  use them: ")]
    command = shlex.split(use.removeprefix("  use them: "))
    assert command[:2] == ["python", str(ROOT / "generate.py")]
    made = subprocess.run([sys.executable, *command[1:], "steps=2", f"output_root={tmp_path / 'gen'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    [grid] = [line for line in made.stdout.splitlines() if line.startswith("  grid: ")]
    assert Path(grid.removeprefix("  grid: ")).is_file()
    assert not noisy_lines(made.stdout + made.stderr)


def test_a_failed_run_ends_with_its_reason_after_the_path_of_its_record(tmp_path):
    proc, [run_dir] = train_subprocess(tmp_path, f"data.path={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: image folder")
    assert f"run record: {run_dir / 'summary.json'} (failed)" in proc.stdout.splitlines()


QUIET = """
import logging, warnings
from conceptlab.console import quiet_third_party
quiet_third_party(verbose={verbose})
from transformers.utils import logging as tl
tl.get_logger("transformers.models.clip").warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
tl.get_logger("transformers.models.clip").warning("a real transformers warning")
logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False, used: False")
logging.getLogger("pytorch_lightning.utilities.rank_zero").warning("a real Lightning warning")
"""


@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_noise_is_filtered_by_message_at_its_source_and_verbose_brings_it_back(verbose):
    code = "import logging; logging.basicConfig(level=logging.INFO)\n" + QUIET.format(verbose=verbose)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a real transformers warning" in proc.stderr and "a real Lightning warning" in proc.stderr
    assert ("requires torchvision" in proc.stderr) is verbose
    assert ("GPU available" in proc.stderr) is verbose


def test_every_hidden_message_says_why():
    assert NOISE and all(n.reason and n.where and n.source in ("warning", "log") for n in NOISE)


def test_the_end_summary_reads_even_without_training_statistics(tmp_path):
    """What another rank's record (or a run that never reported) holds: no loss, no scores."""
    from conceptlab.records import RunRecord
    from conceptlab.train import end_summary, job_line

    record = RunRecord(tmp_path, method="ti", concept="robot", run_name="ti-robot-seed0")
    record.finish("completed")
    assert end_summary(record).splitlines()[0].startswith("conceptlab: completed in ")
    assert "loss" not in end_summary(record)
    assert job_line(record) == f"[{tmp_path.name}] ti-robot-seed0: completed"
