"""The command lines: Hydra's apps for train, generate and evaluate (their schemas and every method's
registered with Hydra, `--help` rendered from the schemas' help), and the report's.

The console scripts (`conceptlab-train`, ...), `conceptlab <command>` and the checkout's `train.py`,
`generate.py` and `evaluate.py` all start here.
"""

from __future__ import annotations

import atexit
import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import DictConfig, OmegaConf

from .config import (
    CONFIG_PATH,
    DataConfig,
    EvaluateRunConfig,
    GenerateConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    key_help,
)
from .methods import registered_methods


def register_configs() -> None:
    """Register the schemas (and every discovered method's) with Hydra's ConfigStore; add --help's resolver."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="evaluate_schema", node=EvaluateRunConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name, method in registered_methods().items():
        cs.store(group="schema/method", name=name, node=method.Config)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
    if not OmegaConf.has_resolver("conceptlab_help"):
        OmegaConf.register_new_resolver("conceptlab_help", help_text)


def hydra_app(config_name: str, task: Callable[..., Any]) -> None:
    """Run `task` as the Hydra app of conf/<config_name>.yaml (the command line is Hydra's)."""
    refuse_unquoted_home(sys.argv[1:])
    # Registered first, so it runs last, after every library's own exit handler: the objects left are
    # then no longer traced by the collector while the interpreter tears itself down (measured: a
    # process that imported Lightning ends 0.85 s sooner, 0.97 s -> 0.12 s, on the 2-core CI machine).
    atexit.register(gc.freeze)
    # A search (hydra/sweeper=optuna) imports Optuna's storage layer, whose alembic announces each of its
    # plugins at INFO under Hydra's logging: one line each, none of them the user's.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    register_configs()
    hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")(task)()


# The apps' modules load when their task runs, not at start: `python train.py --help` and a mistyped
# config group are answered without importing Lightning, diffusers' pipelines and the metrics
# (measured: --help in 4.1 s, where importing train.py alone takes 6.5 s, on the 2-core CI machine;
# docs/performance.md).
def refuse_unquoted_home(argv: list[str]) -> None:
    """`key=~/x`: Hydra's override grammar refuses an unquoted `~` with a lexer error that names neither the
    key nor the fix; one line and exit status 2 instead, before Hydra parses anything."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and value.startswith("~") and not key.startswith("-"):
            print(
                f"error: {arg}: Hydra's override grammar takes no unquoted ~; write {key}=$HOME{value[1:]} (the "
                f"shell expands it) or quote it: '{key}=\"{value}\"'",
                file=sys.stderr,
            )
            sys.exit(2)


def train_task(cfg: DictConfig, pack: Any = None) -> dict[str, Any] | float | str:
    """train.py's task; `pack` is a packed sweep's member for this job (conceptlab.packing)."""
    from . import train

    return train.main(cfg, pack)


def generate_task(cfg: DictConfig) -> dict[str, Any]:
    from . import generate

    return generate.main(cfg)


def evaluate_task(cfg: DictConfig) -> list[dict[str, Any]]:
    from . import evaluate

    return evaluate.main(cfg)


def train() -> None:
    """`python train.py`, `conceptlab-train`, `conceptlab train`."""
    hydra_app("train", train_task)


def generate() -> None:
    """`python generate.py`, `conceptlab-generate`, `conceptlab generate`."""
    sys.argv[1:] = quote_text_overrides(sys.argv[1:])
    hydra_app("generate", generate_task)


def evaluate() -> None:
    """`python evaluate.py`, `conceptlab-evaluate`, `conceptlab evaluate`."""
    hydra_app("evaluate", evaluate_task)


def report() -> None:
    """`python scripts/report.py`, `conceptlab-report`, `conceptlab report`."""
    from . import report

    sys.exit(report.main())


TEXT_KEYS = ("prompt", "negative_prompt")


def quote_text_overrides(argv: list[str]) -> list[str]:
    """Quote `prompt=...` / `negative_prompt=...` for Hydra, whose override grammar rejects `<` and `>`.

    So `python generate.py prompt="a photo of <my-cat>"` works as typed; already quoted values are kept.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if (
            sep
            and key.lstrip("+") in TEXT_KEYS
            and not (value[:1] in "'\"" and value[:1] == value[-1:] and value)
        ):
            value = "'" + value.replace("'", "\\'") + "'"
        quoted.append(f"{key}{sep}{value}" if sep else arg)
    return quoted


def app_groups(app: str) -> list[tuple[str, list[str]]]:
    """The config groups an app reads, each with its options (Hydra's config loader must be set up)."""
    loader = GlobalHydra.instance().config_loader()
    shown = []
    for group in sorted(loader.list_groups("")):
        if group in ("hydra", "schema"):
            continue
        options = loader.get_group_options(group, ObjectType.CONFIG)
        if options and (
            app == "train"
            or group in ("model", *(("data", "encoders", "protocol") if app == "evaluate" else ()))
        ):
            shown.append((group, options))
    return shown


def app_sections(app: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The keys an app reads, in titled sections: (title, [(key, default, help)])."""
    sections: list[tuple[str, type]]
    if app == "train":
        sections = [("", TrainConfig), ("model.", ModelConfig), ("data.", DataConfig)]
        sections += [(f"method.  (method={n})", m.Config) for n, m in registered_methods().items()]
    elif app == "evaluate":
        sections = [("", EvaluateRunConfig), ("data.", DataConfig)]
    else:
        sections = [("", GenerateConfig), ("model.", ModelConfig)]
    out = []
    for title, schema in sections:
        prefix = title.split(" ")[0]
        rows = [
            row
            for row in key_help(schema, prefix)
            if not (prefix == "" and row[0] in ("model", "method", "data", "trainer", "logger"))
        ]
        out.append((title, rows))
    return out


def help_text(app: str) -> str:
    """`--help` for train.py / generate.py / evaluate.py: every group with its options, every key with its help."""
    lines = [HELP_HEADERS[app], "", "Config groups (group=option):"]
    for group, options in app_groups(app):
        lines.append(f"  {GROUP_NOTES.get(group, group + ':')} {', '.join(options)}")
    for title, rows in app_sections(app):
        lines += ["", f"Keys{' of ' + title if title else ''}:"]
        lines += [f"  {key} = {default}".ljust(44) + f"  {text}" for key, default, text in rows]
    # Hydra fills the help template with string.Template: a literal dollar sign must be doubled.
    return "\n".join(lines).replace("$", "$$")


def reference_markdown() -> str:
    """The configuration reference of the docs (docs/reference.md): for train.py, generate.py and
    evaluate.py, every config group with its options and every key with its default and help, rendered
    from the same schemas and Hydra config loader as `--help`, so the page cannot drift from the code."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    register_configs()
    lines: list[str] = []
    with initialize_config_module("conceptlab.conf", version_base="1.3"):
        for app in ("train", "generate", "evaluate"):
            lines += [
                f"## {app}.py",
                "",
                "```",
                HELP_HEADERS[app],
                "```",
                "",
                "| group | options |",
                "|---|---|",
            ]
            lines += [f"| `{g}` | {', '.join(f'`{o}`' for o in options)} |" for g, options in app_groups(app)]
            for title, rows in app_sections(app):
                lines += [
                    "",
                    f"### {app}.py: {'keys of ' + title.strip() if title else 'top-level keys'}",
                    "",
                ]
                lines += ["| key | default | what it is |", "|---|---|---|"]
                lines += [f"| `{key}` | `{cell(default)}` | {cell(text)} |" for key, default, text in rows]
            lines.append("")
    return "\n".join(lines)


GROUP_NOTES = {
    "experiment": "+experiment= (a study to sweep with -m):",
    "bundled": "bundled (chosen by model and data: data=objects|styles on a model with its own sets):",
    "recipe": "recipe (chosen by model and method: tuned settings on a model that needs its own):",
    "evaluators": "evaluators (chosen by model; evaluators=none turns evaluation off):",
    "samples": "samples (chosen by model: grids with the model's own sampler; samples.* keys still win):",
}
HELP_HEADERS = {
    "train": "conceptlab train.py: teach a frozen Stable Diffusion model a concept.\n"
    "  python train.py method=ti data=objects [key=value ...]     one run\n"
    "  python train.py -m +experiment=ti_vs_hypernet              a sweep (experiments/)\n"
    "  python train.py --cfg job                                  the composed config, values resolved",
    "evaluate": "conceptlab evaluate.py: CLIP-I, DINO and CLIP-T of learned concepts under a protocol.\n"
    "  python evaluate.py run=outputs/runs/<run> [concept=best]    one run (writes <run>/eval/)\n"
    "  python evaluate.py sweep=outputs/multirun/<date>           every run of a sweep\n"
    "  python evaluate.py concepts=[my.pt] model=sd15 data.path=... data.class_word=dog",
    "generate": "conceptlab generate.py: generate with learned concepts.\n"
    '  python generate.py prompt="a photo of <my-cat> <hypernet:ink:0.7>" concepts=[outputs/runs/...]',
}
