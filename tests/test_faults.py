"""Faults a user meets in their environment, refused in one line (exit 2) or absorbed, through train.py."""

import subprocess
import sys

import pytest
from conftest import ROOT, compose, run_train, train_subprocess


@pytest.mark.slow
def test_a_value_wandb_refuses_is_one_line_before_anything_loads(tmp_path):
    """WANDB_MODE=bogus: one line naming the variable and what W&B accepts (an empty WANDB_MODE counts as
    unset: test_sweeps.test_every_sweep_job_is_its_own_wandb_run_with_a_flat_config runs with one)."""
    proc, _ = train_subprocess(tmp_path / "bogus", "logger=wandb", env={"WANDB_MODE": "bogus"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: WANDB_MODE='bogus': W&B refuses it (Input should be 'online', 'offline'")


def test_a_checkpoint_path_that_is_no_checkpoint_is_named_by_its_key(tmp_path):
    from PIL import Image

    from conceptlab.errors import ConfigError

    picture = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(picture)
    with pytest.raises(ConfigError, match=rf"^ckpt_path={picture}: {picture} is not a readable torch file"):
        run_train(tmp_path / "run", f"ckpt_path={picture}")


@pytest.mark.slow
def test_resume_passes_over_an_unreadable_record_and_refuses_a_run_with_nothing_left(tmp_path, caplog):
    from conceptlab.errors import ConfigError

    done = run_train(tmp_path / "runs" / "first", "trainer.max_steps=2", "samples.every_n_steps=0")
    assert done["status"] == "completed"
    damaged = tmp_path / "runs" / "other" / ".hydra"
    damaged.mkdir(parents=True)
    (damaged / "overrides.yaml").write_text("- [unclosed")  # another run's damaged record
    (damaged.parent / "checkpoints").mkdir()
    (damaged.parent / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"already reached trainer.max_steps=2 \(step 2\); give a larger"):
        run_train(
            tmp_path / "runs" / "again", "trainer.max_steps=2", "samples.every_n_steps=0", "resume=true"
        )
    assert (
        "could not be read and were passed over" in caplog.text
        and "other/.hydra/overrides.yaml" in caplog.text
    )
    # a larger budget continues it
    more = run_train(
        tmp_path / "runs" / "more", "trainer.max_steps=3", "samples.every_n_steps=0", "resume=true"
    )
    assert more["steps"] == 3 and more["resumed_from"].endswith("first/checkpoints/last.ckpt")


def test_a_hypernetwork_file_whose_structure_cannot_build_is_named(tmp_path):
    from conceptlab.errors import ConceptFileError
    from conceptlab.formats import write_torch_file
    from conceptlab.methods import read_concept

    path = write_torch_file(
        tmp_path / "ink.pt", {768: ({}, {}), "layer_structure": [1, -2, 1], "name": "ink"}
    )
    with pytest.raises(ConceptFileError, match=rf"{path}: its layer_structure \[1, -2, 1\] cannot build"):
        read_concept(path)


@pytest.mark.slow
@pytest.mark.parametrize("app", ["train.py", "generate.py"])
def test_an_output_root_that_is_a_file_is_one_line_before_anything_is_made(tmp_path, app):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    proc = command(
        tmp_path, app, f"output_root={taken}", *(["prompt=a photo"] if app == "generate.py" else [])
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: output_root={taken}: {taken} is a file, not a folder: give a folder (it is made if missing)"
    )
    assert taken.read_text() == "a file"


def test_an_unquoted_tilde_gets_the_fix_not_a_lexer_error(tmp_path):
    proc = command(tmp_path, "train.py", "method.init_from=~/missing.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Lexer" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line == ("error: method.init_from=~/missing.pt: Hydra's override grammar takes no unquoted ~; write "
                    "method.init_from=$HOME/missing.pt (the shell expands it) or quote it: "
                    "'method.init_from=\"~/missing.pt\"'")  # fmt: skip


def test_generate_on_a_device_that_is_not_there_is_one_line(tmp_path):
    import torch

    from conceptlab.errors import ConfigError
    from conceptlab.generate import run

    cases = [("bogus", r"device='bogus': use auto, cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        cases.append(
            ("cuda", r"device=cuda, but torch sees no CUDA device here: use device=cpu or device=auto")
        )
    for device, said in cases:  # refused before the backbone loads
        with pytest.raises(ConfigError, match=said):
            run(
                compose([f"device={device}", "prompt=a photo", "model=tiny"], config="generate"),
                tmp_path / device,
            )


def command(tmp_path, app: str, *args: str) -> subprocess.CompletedProcess:
    """`python <app> ...` as a user types it (no W&B), in tmp_path."""
    return subprocess.run([sys.executable, str(ROOT / app), *args, "logger=csv" if app == "train.py" else "steps=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
