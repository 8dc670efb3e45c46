"""Every bad value is refused before anything trains or generates: one line quoting the value as given
and saying what is valid (the ranges live in the structured configs, config.opt(valid=...))."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, run_train

from conceptlab.errors import ConfigError

TRAIN_CASES = [
    (["method.lr=-1"], r"method.lr=-1: rates must be positive finite numbers"),
    (["method.lr=nan"], r"method.lr=nan: rates must be positive finite numbers"),
    (["data.batch_size=0"], r"data.batch_size=0: must be a finite number in \[1, inf\)"),
    (["optim.betas=[0.9,1.0]"], r"optim.betas=\[0.9, 1.0\]: each must be a finite number in \[0, 1\)"),
    (["optim.betas=[0.9]"], r"optim.betas=\[0.9\]: give two"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0: must be a finite number in \[1, inf\)"),
    (
        ["trainer.gradient_clip_val=nan"],
        r"trainer.gradient_clip_val=nan: must be a finite number in \(0, inf\)",
    ),
    (["samples.seeds=[]"], r"samples.seeds=\[\]: give at least one"),
    (["data.flip_p=1.5"], r"data.flip_p=1.5: must be a finite number in \[0, 1\]"),
    (["evaluate.num_samples=0"], r"evaluate.num_samples=0: must be"),
    (["method.num_vectors=80"], r"method.num_vectors=80: must be a finite number in \[1, 75\]"),
    (["method=lora", "method.rank=0"], r"method.rank=0: must be a finite number in \[1, inf\)"),
    (
        ["method=hypernet", "method.layer_structure=[1,0,1]"],
        r"method.layer_structure=\[1.0, 0.0, 1.0\]: each",
    ),
    (["data.sample_prompts=[]"], r"data.sample_prompts=\[\]: give at least one"),
    (["concept=" + "a" * 230], r"is 230 characters: at most 200"),
    (["seed=-1"], r"seed=-1: must be a finite number in \[0, 4294967295\]"),
    (["seed=1099511627776"], r"seed=1099511627776: must be a finite number in \[0, 4294967295\]"),
    (["optim.scheduler=bogus"], r"optim.scheduler='bogus': use one of linear, cosine, .*constant"),
    # Two problems: both named in the one line.
    (["data.batch_size=0", "optim.eps=0"], r"optim.eps=0.0: must be .*; data.batch_size=0: must be"),
]


@pytest.mark.parametrize(("overrides", "message"), TRAIN_CASES, ids=lambda v: str(v)[:40])
def test_bad_training_values_are_refused_before_anything_loads(tmp_path, overrides, message, monkeypatch):
    import conceptlab.train

    monkeypatch.setattr(conceptlab.train, "load_backbone", lambda cfg: pytest.fail("the backbone loaded"))
    with pytest.raises(ConfigError, match=message) as err:
        run_train(tmp_path / "run", *overrides)
    assert "\n" not in str(err.value)


def test_a_placeholder_that_reaches_past_the_text_window_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"reach past the text encoder's 77: fewer method.num_vectors"):
        run_train(tmp_path / "run", "method.num_vectors=74", "data.templates=style")
    # The same vectors with short templates fit.
    assert run_train(tmp_path / "ok", "method.num_vectors=60", "trainer.max_steps=1")["status"] == "completed"


def test_a_resolution_the_backbone_cannot_take_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.resolution=40 must be a multiple of 16"):
        run_train(tmp_path / "run", "data.resolution=40")


GENERATE_CASES = [
    (["steps=0"], r"steps=0: must be a finite number in \[1, inf\)"),
    (["guidance_scale=nan"], r"guidance_scale=nan: must be"),
    (["seeds=[]"], r"seeds=\[\]: give at least one"),
    (["multipliers=[0.5,inf]"], r"multipliers=\[0.5, inf\]: each must be a finite number"),
    (["resolution=40"], r"resolution=40 must be a multiple of 16"),
    (["prompt=a <hypernet:ink:nan> cat"], r"multiplier 'nan' in <hypernet:ink:nan> is not a finite number"),
]


@pytest.mark.parametrize(("overrides", "message"), GENERATE_CASES, ids=lambda v: str(v)[:30])
def test_bad_generation_values_are_refused(tmp_path, overrides, message):
    from conceptlab.cli import quote_text_overrides
    from conceptlab.generate import run

    args = ["model=tiny", "prompt=a cat", "steps=1", *overrides]
    if "hypernet" in str(overrides):
        args.append(f"concepts=[{ink_hypernetwork(tmp_path)}]")
    with pytest.raises(ConfigError, match=message):
        run(compose(quote_text_overrides(args), config="generate"), tmp_path / "gen")
    assert not (tmp_path / "gen" / "images").exists()


def ink_hypernetwork(tmp_path):
    from conceptlab.methods.hypernetwork import HypernetworkLayers, write_a1111_hypernetwork

    return write_a1111_hypernetwork(
        tmp_path / "ink.pt", HypernetworkLayers("ink", enable_sizes=[32]), 1, None, "tiny"
    )


def test_help_shows_the_valid_ranges():
    from conceptlab.config import TrainConfig, key_help

    rows = {key: text for key, _, text in key_help(TrainConfig)}
    assert rows["trainer.max_steps"].endswith("[valid: [1, inf)]")


def test_a_checkpoint_holding_code_is_refused_in_one_line_whatever_the_environment(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch's default off: conceptlab passes weights_only itself."""
    import shutil

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    (tmp_path / "victim").mkdir()

    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    torch.save({"state_dict": {}, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(
        ConfigError, match=r"evil.ckpt holds Python objects that are not weights \(shutil.rmtree\)"
    ):
        run_train(tmp_path / "run", f"ckpt_path={tmp_path / 'evil.ckpt'}")
    # The same file as a run folder's own checkpoint (a requeue) is refused the same way.
    (tmp_path / "job" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "evil.ckpt", tmp_path / "job" / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="holds Python objects that are not weights"):
        run_train(tmp_path / "job")
    assert (tmp_path / "victim").is_dir()


def test_a_template_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from conceptlab.errors import ConceptDataError

    templates = tmp_path / "mine.txt"
    templates.write_bytes(
        b"a photo of {}\na painting of {}\n" + "une photo de {} prise à Paris\n".encode("latin-1")
    )
    with pytest.raises(
        ConceptDataError, match=r"mine.txt \(a template file\) is not UTF-8 text: line 3 holds byte 0xe0"
    ):
        run_train(tmp_path / "run", f"data.templates={templates}")
