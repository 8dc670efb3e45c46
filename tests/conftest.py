"""Shared fixtures: the tiny backbone built once per session, configs composed as users compose them,
and helpers that run the real entry point (in-process and as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT.parent / "shared" / "datasets" / "dreambooth"
# Seconds-sized runs on the random tiny backbone: a few steps, one tiny sample grid, checkpoints
# every 2 steps, no W&B process. (Toy-world tests add model=toy after these; the last one wins.)
FAST = [
    "model=tiny",
    "trainer.max_steps=4",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=2",
    "samples.every_n_steps=2",
    "samples.num_inference_steps=2",
    "samples.seeds=[0]",
    "evaluate.num_samples=2",
    "evaluate.num_inference_steps=2",
    "evaluate.metric_prompts=1",
    "evaluate.metric_samples=1",
    "protocol.num_inference_steps=2",
    "data.batch_size=2",
    "logger=csv",
]


# The longest tests (seconds on CPU-2, measured 2026-12-07), run first: with two workers that steal work
# from each other (`--dist worksteal` in pyproject), the suite then ends on short tests on both workers
# instead of one worker finishing a long test alone. A name not listed keeps its place.
LONG_FIRST = {
    "test_hypernetwork_learns_the_unseen_style_and_is_the_bare_model_at_zero": 96,
    "test_gpu_checks_script_runs_every_check_on_the_cpu": 78,
    "test_pretraining_runs_every_stage_and_resumes": 71,
    "test_a_word_learned_from_the_balanced_set_draws_closer_to_uniform_than_the_bare_prompt": 48,
    "test_caption_following_of_the_shipped_checkpoint_meets_its_targets": 46,
    "test_packed_and_one_by_one_sweeps_leave_the_same_records": 35,
    "test_the_main_command_says_where_the_run_is_what_it_learned_and_how_to_use_it": 34,
    "test_evaluate_py_scores_a_sweep_and_the_report_reads_it": 33,
    "test_lora_learns_the_attribute_combination_and_is_the_bare_model_at_zero": 33,
    "test_the_main_job_runs_from_an_empty_folder": 31,
    "test_ddp_jobs_inside_a_local_sweep_do_not_start_new_sweeps": 30,
    "test_the_newer_methods_give_packed_jobs_the_files_they_give_alone": 28,
    "test_textual_inversion_learns_the_attribute_combination": 27,
    "test_bench_sweep_times_both_launchers_on_the_same_jobs": 26,
    "test_unreachable_wandb_server_falls_back_to_offline": 25,
    "test_the_recipe_knobs_give_packed_jobs_the_files_they_give_alone": 24,
    "test_four_job_sweep_then_the_report": 22,
    "test_a_running_run_holds_its_folder_and_sigterm_records_interrupted": 22,
    "test_composition_sweep_pairs_the_runs_and_the_report_shows_them": 21,
    "test_ddp_on_cpu_gives_one_run_record_and_the_single_process_result": 21,
    "test_signalled_job_checkpoints_requeues_and_ends_with_the_uninterrupted_embedding": 54,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -LONG_FIRST.get(item.originalname or item.name, 0))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2: each worker (and each process a test starts) computes on one core, the two in parallel.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """No network, no W&B server, a session-wide cache for the tiny backbone."""
    cache = tmp_path_factory.mktemp("cache")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CONCEPTLAB_CACHE": str(cache),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield cache
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_dir(isolated_env) -> Path:
    """The embedded tiny backbone's folder (built once, through the same code path users take)."""
    from conceptlab.backbone import ensure_tiny_backbone
    from conceptlab.config import ModelConfig

    return ensure_tiny_backbone(ModelConfig())


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, str]:
    """A random-weight CLIP and DINO-style ViT, saved with save_pretrained (with their processors) and
    loaded back through the path a hub model's folder takes: {"clip": folder, "dino": folder}."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )  # fmt: skip

    from conceptlab.backbone import clip_tokenizer

    root = tmp_path_factory.mktemp("encoders")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        ))  # fmt: skip
        dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8), add_pooling_layer=False)  # fmt: skip
    size = {"height": 32, "width": 32}
    clip.save_pretrained(root / "clip")
    CLIPProcessor(
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=size), clip_tokenizer()
    ).save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size=size).save_pretrained(root / "dino")
    return {"clip": str(root / "clip"), "dino": str(root / "dino")}


@pytest.fixture
def backbone(tiny_dir):
    """A fresh frozen tiny backbone (methods change its tokenizer, so never share one)."""
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    return load_backbone(ModelConfig(path=str(tiny_dir)))


def fit_a_few_steps(backbone, method, data_path: str, lr: float, templates: str = "object", steps: int = 3):
    """Train `method` (attached) a few real optimizer steps on a bundled set, as train.py's module does;
    returns the ConceptModule and the data module."""
    import pytorch_lightning as pl

    from conceptlab.config import DataConfig, OptimConfig
    from conceptlab.data import ConceptDataModule, read_concept_images
    from conceptlab.module import ConceptModule

    cfg = DataConfig(path=data_path, templates=templates, batch_size=2, repeats=1)
    data = ConceptDataModule(cfg, read_concept_images(cfg), backbone, method.prompt_text, 0, 64,
                             cache_context=not method.changes_text_encoding)  # fmt: skip
    module = ConceptModule(backbone, method, OptimConfig(), lr_schedule=[(lr, None)], max_steps=steps)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, data


def unet_output(backbone, seed: int = 0):
    """The UNet's prediction for fixed random latents, timesteps and text context."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, backbone.context_dim, generator=gen)
    with torch.no_grad():
        return backbone.unet(latents, torch.tensor([10, 500]), context).sample


def compose(overrides: list[str], with_hydra: bool = False, config: str = "train"):
    """The config exactly as `python train.py <overrides>` (or generate.py) composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from conceptlab.cli import register_configs

    register_configs()
    with initialize_config_module(config_module="conceptlab.conf", version_base="1.3"):
        return hydra_compose(config, overrides=overrides, return_hydra_config=with_hydra)


def run_train(run_dir: Path, *overrides: str, fast: bool = True) -> dict:
    """Run conceptlab.train.run in-process with Hydra's runtime set as train.py would; return the summary."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from conceptlab.train import run

    args = [*(FAST if fast else []), f"output_root={run_dir.parent}", *overrides]
    cfg = compose(args, with_hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.overrides.task = args
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes the run folder; the run writes .hydra/ itself
    with open_dict(cfg):
        del cfg.hydra
    return run(cfg)


def train_subprocess(
    cwd: Path, *overrides: str, fast: bool = True, timeout: int = 300, env: dict | None = None
):
    """`python train.py ...` as a user types it; returns (completed process, run directories made)."""
    cwd.mkdir(parents=True, exist_ok=True)
    before = set((cwd / "outputs").glob("runs/*")) if (cwd / "outputs").exists() else set()
    args = [sys.executable, str(ROOT / "train.py"), *(FAST if fast else []), f"output_root={cwd / 'outputs'}"]
    # Output to files, not pipes: a grandchild that outlives the run (W&B's service process, retrying a
    # dead server) would hold a pipe open and keep the test waiting after train.py has exited.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            [*args, *overrides], cwd=cwd, stdout=out, stderr=err, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
            # env: extra variables; a None value removes one
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
        ).returncode  # fmt: skip
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(args, code, out.read(), err.read())
    after = set((cwd / "outputs").glob("runs/*")) if (cwd / "outputs").exists() else set()
    return proc, sorted(after - before)


def sweep(tmp_path: Path, *args: str, env: dict | None = None):
    """`python train.py -m` (FAST settings) into tmp_path; returns (completed process, the sweep folder).
    env: extra variables; a None value removes one."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *FAST, *args, f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
    )  # fmt: skip
    [folder] = list((tmp_path / "multirun").iterdir())
    return proc, folder


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def check_resume(tmp_path, *overrides, file="robot.safetensors", data="data=objects"):
    """Stopped after 3 steps and resumed to 6 (resume=true) gives exactly the 6-step run's concept file."""
    import torch
    from safetensors.torch import load_file as load

    args = [data, *overrides]
    run_train(tmp_path / "a" / "straight", *args, "trainer.max_steps=6")
    run_train(tmp_path / "b" / "first", *args, "trainer.max_steps=3")
    resumed = run_train(tmp_path / "b" / "resumed", *args, "trainer.max_steps=6", "resume=true")
    assert resumed["steps"] == 6 and resumed["steps_this_process"] == 3
    ours = load(tmp_path / "b" / "resumed" / "concepts" / file)
    reference = load(tmp_path / "a" / "straight" / "concepts" / file)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def start_long_run(output_root: Path, rows: int) -> subprocess.Popen:
    """`python train.py` with a step budget it never reaches, returned once metrics.csv holds `rows`
    lines (a run in the middle of training, to signal or to compete with)."""
    import time

    args = [sys.executable, str(ROOT / "train.py"), "model=tiny", "trainer.max_steps=100000",
            "checkpoint.every_n_steps=0", "samples.every_n_steps=0", "evaluate.enabled=false", "logger=csv",
            "trainer.enable_progress_bar=false", f"output_root={output_root}"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    for _ in range(240):
        time.sleep(0.5)
        metrics = list(output_root.glob("runs/*/metrics.csv"))
        if metrics and len(metrics[0].read_text().splitlines()) > rows:
            break
    return proc


def wandb_records(run_folder: Path) -> list:
    """The records of an offline W&B run (`.../wandb/offline-run-*`), each parsed with W&B's own protobuf
    classes (`wandb_internal_pb2.Record`); the file's framing is LevelDB's log format behind a 7-byte
    header (":W&B", magic, version), blocks of 32 KiB whose records may span blocks."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = list(Path(run_folder).glob("run-*.wandb"))
    data, block, position = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little left in the block for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # its first or a middle piece
            pending += chunk
    return records


def wandb_values(records: list, kind: str) -> dict:
    """The last value of each key a run's `history` or `summary` records set (JSON-decoded)."""
    values = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            items = record.history.item if kind == "history" else record.summary.update
            for item in items:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                values[key] = json.loads(item.value_json)
    return values
