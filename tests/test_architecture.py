"""The shape of the code: methods are plugins, the toy world is an extension, every key has help."""

import dataclasses
import re
import subprocess
import sys

from conftest import ROOT

from conceptlab.methods import registered_methods

CORE = sorted(p for p in (ROOT / "src" / "conceptlab").glob("*.py"))
METHOD_NAMES = re.compile(
    r"\b(textual_inversion|TextualInversion|hypernetwork|Hypernetwork\w*|lora|LoRA\w*)\b"
)


def code_lines(path):
    """The module's lines of code: docstrings and comments left out (they may name examples)."""
    text = re.sub(r'"""[\s\S]*?"""', "", path.read_text())
    return [line.split("#", 1)[0] for line in text.splitlines()]


def test_core_modules_import_neither_a_method_nor_the_toy_world():
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in CORE
        for line in code_lines(path)
        if re.search(r"\btoyworld\b", line) or (re.search(r"\bimport\b", line) and METHOD_NAMES.search(line))
    ]
    assert not offenders, offenders


def test_methods_are_discovered_with_their_configs_and_prompt_tags():
    methods = registered_methods()
    assert {"ti", "hypernet", "lora"} <= set(methods)
    assert {m.prompt_tag for m in methods.values()} >= {None, "hypernet", "lora"}
    for name, method in methods.items():
        assert (ROOT / "conf" / "method" / f"{name}.yaml").is_file(), name
        assert method.Config().name == name and method.file_formats


def test_every_key_has_help_and_help_lists_every_group_and_method_key():
    from conceptlab.config import GenerateConfig, TrainConfig, key_help

    schemas = [TrainConfig, GenerateConfig, *(m.Config for m in registered_methods().values())]
    for schema in schemas:
        for field in dataclasses.fields(schema):
            if field.name != "_target_":
                assert field.metadata.get("help"), f"{schema.__name__}.{field.name} has no help"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for group in ("model", "method", "data", "trainer", "logger", "evaluators", "+experiment="):
        assert f"  {group}" in proc.stdout, group
    assert "schema" not in proc.stdout
    for key, _, text in key_help(TrainConfig) + key_help(registered_methods()["lora"].Config, "method."):
        if key not in ("model", "method", "data"):  # groups: listed with their options
            assert f"  {key} = " in proc.stdout and text in proc.stdout, key


def test_yaml_files_hold_choices_not_copies_of_defaults():
    """No method, model, trainer or logger yaml repeats a value its structured config already has."""
    import yaml

    from conceptlab.config import LoggerConfig, ModelConfig, TrainerConfig

    schemas = {"model": ModelConfig(), "trainer": TrainerConfig(), "logger": LoggerConfig()}
    schemas.update({f"method/{n}": m.Config() for n, m in registered_methods().items()})
    copies = []
    for path in sorted((ROOT / "conf").glob("*/*.yaml")):
        group = path.parent.name
        schema = schemas.get(f"method/{path.stem}") if group == "method" else schemas.get(group)
        if schema is None:
            continue
        values = yaml.safe_load(path.read_text()) or {}
        for key, value in values.items():
            if key != "defaults" and hasattr(schema, key) and getattr(schema, key) == value and key != "name":
                copies.append(f"{path.relative_to(ROOT)}: {key}")
    assert not copies, copies


def test_a_method_from_another_package_is_found_through_its_entry_point(monkeypatch):
    """A user's package advertises its Method under `conceptlab.methods`; it joins the shipped ones."""
    from importlib.metadata import EntryPoint

    import pytest

    import conceptlab.methods as methods
    from conceptlab.errors import ConfigError
    from conceptlab.methods.textual_inversion import TextualInversion

    class MyMethod(TextualInversion):
        name = "mine"

    def fake_entry_points(group):
        assert group == methods.ENTRY_POINT_GROUP
        entry = EntryPoint(name="mine", value="my_package:MyMethod", group=group)
        monkeypatch.setattr(EntryPoint, "load", lambda self: MyMethod if self.name == "mine" else object)
        return [entry, EntryPoint(name="broken", value="my_package:nothing", group=group)][:n]

    n = 1
    monkeypatch.setattr(methods, "entry_points", fake_entry_points)
    methods.registered_methods.cache_clear()
    try:
        found = methods.registered_methods()
        assert found["mine"] is MyMethod and {"ti", "hypernet"} <= set(found)
        n = 2
        methods.registered_methods.cache_clear()
        with pytest.raises(ConfigError, match="broken = my_package:nothing .* is not a conceptlab Method"):
            methods.registered_methods()
    finally:
        methods.registered_methods.cache_clear()
