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


# The layers of DESIGN.md, top to bottom: a module imports only from its own layer or below.
LAYERS = [
    ("entry points", ["conceptlab.__main__", "conceptlab.cli", "hydra_plugins"]),
    ("composition", ["conceptlab.train", "conceptlab.packing", "conceptlab.generate", "conceptlab.evaluate"]),
    ("extensions", ["conceptlab.toyworld"]),
    ("sweeps' end", ["conceptlab.hydra_callbacks", "conceptlab.report"]),
    (
        "runtime",
        [
            "conceptlab.module",
            "conceptlab.callbacks",
            "conceptlab.sampling",
            "conceptlab.loggers",
            "conceptlab.records",
            "conceptlab.console",
            "conceptlab.data",
            "conceptlab.metrics",
            "conceptlab.evalcache",
        ],
    ),  # fmt: skip
    ("inference", ["conceptlab.inference"]),
    ("methods", ["conceptlab.methods"]),
    ("backbones", ["conceptlab.backbone", "conceptlab.layouts"]),
    (
        "ground",
        [
            "conceptlab.config",
            "conceptlab.formats",
            "conceptlab.runfolder",
            "conceptlab.prompts",
            "conceptlab.schedules",
            "conceptlab.sweeps",
            "conceptlab.atomic",
            "conceptlab.errors",
            "conceptlab.example_sets",
            "conceptlab.wandbmode",
            "conceptlab.conf",
            "conceptlab",
        ],
    ),  # fmt: skip
]


def module_name(path):
    parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """Every import of every module under src/, at the top, inside functions or under TYPE_CHECKING."""
    import ast

    files = {module_name(p): p for p in (ROOT / "src").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                found |= {
                    f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def layer_of(module):
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def test_no_module_imports_one_that_imports_it_back():
    """Deferred and type-only imports included: no circle, however long."""
    graph = import_graph()
    seen, on_path, circles = set(), [], []

    def visit(module):
        if module in on_path:
            circles.append(on_path[on_path.index(module) :] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        on_path.pop()

    for module in sorted(graph):
        visit(module)
    assert not circles, [" -> ".join(c) for c in circles]


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
        for module, imports in graph.items()
        for imported in imports
        if layer_of(imported) < layer_of(module)
    ]
    assert not upward, upward


def test_the_training_step_names_no_pack_and_the_report_no_study():
    module = (ROOT / "src" / "conceptlab" / "module.py").read_text()
    assert not re.search(r"pack", module, re.IGNORECASE)
    report = "\n".join(code_lines(ROOT / "src" / "conceptlab" / "report.py"))
    named = re.findall(
        r"toy|judge|composition|bias|distribution|style_transfer|variation|editing_study", report
    )
    assert not named, named


def test_the_packed_launcher_hands_each_job_its_member_not_a_thread_local():
    packing = (ROOT / "src" / "conceptlab" / "packing.py").read_text()
    assert "threading.local" not in packing and "_local" not in packing


def test_every_method_takes_the_shared_keys_from_the_base_config():
    from conceptlab.methods.base import MethodConfig

    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    for name, method in registered_methods().items():
        assert issubclass(method.Config, MethodConfig), name
        assert shared <= {f.name for f in dataclasses.fields(method.Config)}, name
        assert method.name == method.Config.name == name


def test_the_learning_rate_is_parsed_in_one_place():
    parsers = [
        f"{path.relative_to(ROOT)}"
        for path in (ROOT / "src").rglob("*.py")
        if "parse_lr_schedule(" in "\n".join(code_lines(path)) and path.name != "schedules.py"
    ]
    assert parsers == ["src/conceptlab/methods/base.py"], parsers
