"""Configs compose as users compose them; a typo in a key is an error, not a silent default."""

from pathlib import Path

import pytest
from conftest import ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))],
)
def test_every_config_option_composes(group, option):
    plus = (
        "+" if group in ("experiment", "knob") else ""
    )  # added to the defaults (experiments, knobs), not chosen
    # a recipe (<model>_<method>) holds its method's own keys: composed with that method (and model)
    method = []
    if group == "recipe":
        models = sorted((p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")), key=len, reverse=True)
        model = next(m for m in models if option.startswith(m + "_"))
        method = [f"model={model}", f"method={option.removeprefix(model + '_')}"]
    cfg = compose([*method, f"{plus}{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_default_run_is_ti_on_the_toy_worlds_object_with_the_shipped_toy_backbone():
    cfg = compose([])
    assert cfg.method.name == "ti"
    assert cfg.model.name == "toy" and cfg.model.path == "pkg://conceptlab.toyworld/checkpoint"
    assert list(cfg.evaluators) == ["judge", "metrics"]  # model=toy selects the toy world's evaluators
    assert cfg.encoders.clip == "pkg://conceptlab.toyworld/checkpoint/clip" and cfg.protocol.name == "toy"
    assert cfg.data.path == "bundled:toy_combo"
    assert cfg.data.templates == "pkg://conceptlab.toyworld/templates/toy_object.txt"
    assert cfg.method.lr == 1.25e-3 and cfg.trainer.max_steps == 200  # conf/recipe/toy_ti.yaml
    tiny = compose(["model=tiny"])
    assert tiny.model.path is None and tiny.data.path == "bundled:robot" and tiny.method.lr == 5e-4
    assert not tiny.evaluators


@pytest.mark.parametrize(
    "override",
    ["method.num_vectorz=3", "data.patth=x", "trainer.max_stepz=3", "model.pth=x", "nonsense=1"],
)
def test_unknown_key_is_rejected_at_composition(override):
    with pytest.raises(ConfigCompositionException, match="Could not override|not in|Key"):
        compose([override])


def test_wrongly_typed_value_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose(["method.num_vectors=many"])


def test_config_files_start_with_what_they_are_for():
    """Each yaml file opens with a comment saying what it configures."""
    undocumented = []
    for path in (ROOT / "conf").rglob("*.yaml"):
        text = Path(path).read_text()
        if not text.lstrip().startswith("#"):
            undocumented.append(str(path.relative_to(ROOT)))
    assert not undocumented, f"config files without a header comment: {undocumented}"
