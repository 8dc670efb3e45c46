"""The README and the docs site: the site builds strictly, its configuration reference holds every key,
and every train.py / generate.py / evaluate.py command the pages show composes as typed."""

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType

from conceptlab.cli import quote_text_overrides, reference_markdown, register_configs
from conceptlab.config import EvaluateRunConfig, GenerateConfig, TrainConfig, key_help
from conceptlab.methods import registered_methods

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
APPS = {"train.py": "train", "conceptlab-train": "train", "generate.py": "generate",
        "conceptlab-generate": "generate", "evaluate.py": "evaluate", "conceptlab-evaluate": "evaluate"}  # fmt: skip
# Words of a command that are not overrides: Hydra's own flags (and what follows --cfg / --info), and
# "..." for "and the rest of your command".
FLAGS = {"-m", "--multirun", "--help", "--cfg", "--info", "job", "hydra", "all", "defaults", "..."}
# What the reader fills in: `<run>`, `<date>_<time>`, `[...]` (in values other than a prompt's text).
PLACEHOLDER = re.compile(r"<[a-z][\w -]*>|\.\.\.")


def shell_commands(text: str) -> list[str]:
    """The commands of the page's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def app_commands() -> list[tuple[str, str, list[str]]]:
    """(page, app, overrides) for every command of the pages that runs one of the Hydra apps."""
    found = []
    for page in PAGES:
        for command in shell_commands(page.read_text()):
            for part in re.split(r"&&|;", command):
                words = shlex.split(part, comments=True)
                # `python train.py ...`, `conceptlab-train ...`, `python /path/to/train.py ...`
                at = next((i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] in APPS), None)
                if at is None or "--config-dir" in words:  # a user's own config folder is theirs
                    continue
                app = APPS[words[at].rsplit("/", 1)[-1]]
                overrides = [w for w in words[at + 1 :] if w not in FLAGS]
                found.append((page.name, app, [filled(w) for w in overrides]))
    return found


def filled(override: str) -> str:
    """The override with the reader's placeholders filled in (a prompt's `<word>` is the prompt's own)."""
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+") in ("prompt", "negative_prompt"):
        return override
    return f"{key}{sep}{PLACEHOLDER.sub('x', value)}"


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A sweep's overrides with each swept key at its first value: the first job's command line."""
    chosen = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if override.value_type == ValueType.INTERVAL_SWEEP:  # a search's range: its lower end
            text = f"{text.split('=', 1)[0]}={override.value().start}"
        elif override.is_sweep_override():
            text = f"{text.split('=', 1)[0]}={next(iter(override.sweep_string_iterator()))}"
        chosen.append(text)
    return chosen


COMMANDS = app_commands()


def test_the_pages_show_commands_of_every_app():
    apps = {app for _, app, _ in COMMANDS}
    assert apps == {"train", "generate", "evaluate"} and len(COMMANDS) > 40


@pytest.mark.parametrize(
    ("page", "app", "overrides"), COMMANDS, ids=[f"{p}:{' '.join(o)[:50]}" for p, _, o in COMMANDS]
)
def test_every_command_the_pages_show_composes_as_typed(page, app, overrides):
    """Group options, keys and their syntax as the page writes them (paths and photos are the reader's)."""
    if app == "generate":
        overrides = quote_text_overrides(overrides)
    overrides = first_of_each_sweep(overrides)
    register_configs()
    with initialize_config_module("conceptlab.conf", version_base="1.3"):
        compose(app, overrides=overrides, return_hydra_config=True)


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10 and all((ROOT / link).is_file() for link in links)
    commands = shell_commands(readme)
    assert (
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python train.py'
        in commands
    )
    assert (
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && pytest -n 2' in commands
    )


def test_the_configuration_reference_lists_every_key_and_group():
    page = reference_markdown()
    keys = key_help(TrainConfig) + key_help(GenerateConfig) + key_help(EvaluateRunConfig)
    for method in registered_methods().values():
        keys += key_help(method.Config, "method.")
    for key, _, _ in keys:
        if key not in ("model", "method", "data"):
            assert f"| `{key}` |" in page, key
    for group in ("model", "method", "data", "trainer", "experiment", "evaluators"):
        assert f"| `{group}` |" in page, group
    assert "`ti_vs_hypernet`" in page and "`toy`" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs") is None and not (ROOT / ".venv").exists(), reason="mkdocs missing")
def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "<!-- configuration-reference -->" not in reference  # the marker was replaced
    assert "method.initializer_token" in reference and "trainer.max_steps" in reference
    for page in ("getting-started", "methods", "performance", "adding-a-method", "development"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
