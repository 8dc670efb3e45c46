"""One training run: compose -> backbone -> method -> data -> Lightning -> the run record."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .errors import ConceptLabError, ConfigError

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Keys that say how (long) to run, not what to run: `resume=true` continues an earlier run whose
# command differed only in these (so a run can be resumed with a larger step budget).
RESUME_KEYS = ("resume", "ckpt_path", "trainer.max_steps")


def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task: train, and turn a user's mistake into one line on stderr and exit status 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return run(cfg)
    except ConceptLabError as err:
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra runs the sweep's other jobs, then fails with this error
        sys.exit(2)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one concept with one method; returns the summary (also written to summary.json)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .records import RunRecord
    from .sweeps import swept_values

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    concept = cfg.concept or concept_name(cfg.data.path)
    record = RunRecord(
        run_dir,
        method=cfg.method.name,
        concept=concept,
        model=cfg.model.name,
        overrides=overrides,
        swept=swept_values(hydra_cfg),
        study=cfg.study.name,
        sweep_dir=str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None,
        seed=cfg.seed,
        max_steps=cfg.trainer.max_steps,
    )
    try:
        fit(cfg, run_dir, overrides, concept, record)
    except BaseException as err:
        record.finish("interrupted" if isinstance(err, KeyboardInterrupt | SystemExit) else "failed", err)
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish(exit_code=1)  # the next job of a sweep gets a run of its own
        raise
    record.finish("completed")
    return record.data


def concept_name(data_path: str) -> str:
    name = Path(data_path.removeprefix("bundled:")).expanduser().name
    return name or "concept"


def fit(cfg: DictConfig, run_dir: Path, overrides: list[str], concept: str, record) -> None:
    import pytorch_lightning as pl
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from .backbone import load_backbone, resolve_dtype
    from .callbacks import (
        AtomicCheckpointIO,
        ConceptExport,
        JudgeEvaluation,
        LastCheckpoint,
        PreemptionCheckpoint,
        RunStats,
        SampleGrid,
    )
    from .data import ConceptDataModule, read_concept_images
    from .loggers import make_loggers
    from .module import ConceptModule
    from .records import package_versions
    from .schedules import parse_lr_schedule, scaled
    from .sweeps import run_name as sweep_run_name

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", concept):
        raise ConfigError(
            f"concept={concept!r}: use letters, digits, '.', '_' and '-' (it names the concept files)"
        )
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps}: train at least one step")
    ckpt_path = find_resume_checkpoint(cfg, run_dir, overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # Cheap checks first: a bad image folder fails before any model loads.
    check_toyworld(cfg)
    images = read_concept_images(cfg.data)
    backbone = load_backbone(cfg.model)
    try:
        method = instantiate(cfg.method, concept=concept)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConceptLabError):  # the method's own check, not Hydra's wrapper
            raise err.__cause__ from None
        raise
    method.attach(backbone)
    resolution = cfg.data.resolution or backbone.native_resolution
    data = ConceptDataModule(
        cfg.data, images, backbone, method.prompt_text, cfg.seed, resolution,
        cache_context=not method.changes_text_encoding,
    )  # fmt: skip

    swept = record.data["swept"]
    run_name = cfg.logger.name or sweep_run_name(cfg.method.name, concept, cfg.seed, swept)
    record.update(run_name=run_name)
    config = OmegaConf.to_container(cfg, resolve=True)
    stats_file = run_dir / ".train_stats.json"
    stats, export = RunStats(stats_file, job_started=record.started), ConceptExport(run_dir / "concepts")
    last_checkpoint = LastCheckpoint(run_dir / "checkpoints" / "last.ckpt", cfg.checkpoint.every_n_steps)
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # submitit owns requeue, not Lightning
    callbacks = [
        last_checkpoint,
        PreemptionCheckpoint(last_checkpoint),
        SampleGrid(cfg.samples, list(cfg.data.sample_prompts), method.prompt_text, run_dir / "samples"),
        export,
        stats,
    ]
    judge_file = run_dir / "judge.json"
    if cfg.model.toyworld and cfg.evaluate.enabled:
        from .toyworld.checkpoint import load_judge

        judge = load_judge(Path(backbone.path))
        prompts, truth = list(cfg.data.judge.prompts), dict(cfg.data.judge.truth)
        callbacks.append(JudgeEvaluation(cfg.evaluate, judge, prompts, truth, judge_file))
    try:
        trainer = pl.Trainer(
            **trainer_kwargs(cfg, in_sweep=bool(record.data.get("sweep_dir"))),
            max_epochs=-1,
            default_root_dir=str(run_dir),
            logger=make_loggers(
                cfg.logger,
                run_dir,
                run_name,
                config,
                group=wandb_group(cfg, record),
                job_type=cfg.method.name,
                tags=[f"{k}={v}" for k, v in swept.items()],
            ),  # fmt: skip
            callbacks=callbacks,
            plugins=plugins,
            enable_checkpointing=False,  # LastCheckpoint owns checkpoints/last.ckpt
        )
    except (MisconfigurationException, ValueError) as err:
        raise ConfigError(f"trainer: {err}") from err

    dtype = resolve_dtype(cfg.model.dtype, trainer.strategy.root_device, trainer.precision)
    if dtype != backbone.unet.dtype:
        backbone.to(dtype)
    schedule = parse_lr_schedule(method.lr)
    if len(schedule) > 1 and cfg.optim.scheduler != "constant":
        raise ConfigError(
            f"method.lr={method.lr!r} is a step schedule; it replaces optim.scheduler={cfg.optim.scheduler!r}: "
            "use one or the other"
        )
    global_batch = (
        cfg.data.batch_size * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches
    )
    if method.scale_lr:
        schedule = scaled(schedule, global_batch)
    run_info = {"config": config, "versions": package_versions()}  # listed in every checkpoint
    module = ConceptModule(backbone, method, cfg.optim, schedule, cfg.trainer.max_steps, run_info=run_info)
    record.update(
        global_batch_size=global_batch,
        lr=schedule[0][0],
        lr_schedule=", ".join(f"{rate:g}:{until}" if until else f"{rate:g}" for rate, until in schedule),
        trainable_params=sum(p.numel() for p in method.trainable_parameters()),
        num_images=len(images),
        images=[str(im.path) for im in images],
        resolution=resolution,
        resumed_from=str(ckpt_path) if ckpt_path else None,
    )
    record.write()
    with warnings.catch_warnings():
        # The data stream restarts exactly where a checkpoint left it (see data.StreamSampler), the
        # frozen backbone is meant to be in eval mode, and metrics.csv shares the run directory with
        # Hydra's files: Lightning's warnings about these do not apply.
        warnings.filterwarnings(
            "ignore", message=".*resuming from a checkpoint that ended before the epoch ended"
        )
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training")
        warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty")
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero and stats_file.is_file():  # written by the rank-zero training process
        record.update(**json.loads(stats_file.read_text()))
        stats_file.unlink()
    if trainer.is_global_zero and judge_file.is_file():
        record.update(judge=json.loads(judge_file.read_text()))
    record.update(
        files={
            "checkpoint": record.relative(checkpoint) if checkpoint.is_file() else None,
            "concepts": sorted(record.relative(p) for p in (run_dir / "concepts").glob("*")),
            "samples": sorted(record.relative(p) for p in (run_dir / "samples").glob("*.png")),
            "metrics": record.relative(run_dir / "metrics.csv")
            if (run_dir / "metrics.csv").is_file()
            else None,
        },
    )
    if cfg.logger.wandb:
        finish_wandb(record.data)


def check_toyworld(cfg: DictConfig) -> None:
    """The toy world is drawn at one size, and its judge knows only its own attributes."""
    from .toyworld.world import ATTRIBUTES, RESOLUTION

    if cfg.model.toyworld and cfg.data.resolution not in (None, RESOLUTION):
        raise ConfigError(
            f"data.resolution={cfg.data.resolution}: model={cfg.model.name} draws the toy world at "
            f"{RESOLUTION}x{RESOLUTION}; use data.resolution=null (or {RESOLUTION})"
        )
    for attribute, value in cfg.data.judge.truth.items():
        if attribute not in ATTRIBUTES or value not in ATTRIBUTES[attribute]:
            known = "; ".join(f"{a}: {', '.join(values)}" for a, values in ATTRIBUTES.items())
            raise ConfigError(
                f"data.judge.truth.{attribute}={value!r} is not an attribute of the toy world ({known})"
            )


def trainer_kwargs(cfg: DictConfig, in_sweep: bool) -> dict[str, Any]:
    """cfg.trainer for Lightning, with `ddp` made safe inside a local sweep.

    Lightning's `ddp` starts ranks >= 1 by re-running the command line, which under `-m` would start
    a new sweep. Ranks started from outside (SLURM tasks, torchrun) are fine; otherwise a job of a
    local sweep uses `ddp_spawn`, whose ranks are started inside the job.
    """
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    started_outside = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if in_sweep and kwargs.get("strategy") == "ddp" and not started_outside:
        log.info("trainer.strategy=ddp inside a local sweep: using ddp_spawn (ddp would re-run the sweep)")
        kwargs["strategy"] = "ddp_spawn"
    return kwargs


def wandb_group(cfg: DictConfig, record) -> str | None:
    """logger.group, else the study's name plus the sweep's id (its directory name)."""
    if cfg.logger.group:
        return cfg.logger.group
    if cfg.study.name and record.data.get("sweep_dir"):
        return f"{cfg.study.name}-{Path(record.data['sweep_dir']).name}"
    return cfg.study.name


def finish_wandb(summary: dict[str, Any]) -> None:
    """Final metrics into the W&B run's summary and a one-row table; then close the run (one per job)."""
    import wandb

    if wandb.run is not None:
        final = {k: summary.get(k) for k in ("final_loss", "mean_loss", "steps_per_s", "steps", "lr")}
        final.update({k: v for k, v in (summary.get("judge") or {}).items() if k != "step"})
        wandb.run.summary.update(final)
        wandb.run.log({"final_metrics": wandb.Table(columns=list(final), data=[list(final.values())])})
    wandb.finish()


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path | None:
    """This run directory's own last.ckpt (a requeued job), `ckpt_path`, or with `resume=true` the
    newest last.ckpt of an earlier run of the same command."""
    own = run_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        # This very job ran before: requeued on SLURM, or a rerun into a fixed hydra.run.dir.
        log.info("continuing this run from %s", own)
        return own
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return path
    if not cfg.resume:
        return None
    wanted = same_run_key(overrides)
    found = []
    for saved in Path(cfg.output_root).glob("**/.hydra/overrides.yaml"):
        candidate = saved.parent.parent / "checkpoints" / "last.ckpt"
        if saved.parent.parent.resolve() != run_dir.resolve() and candidate.is_file():
            if same_run_key(yaml.safe_load(saved.read_text()) or []) == wanted:
                found.append(candidate)
    if not found:
        raise ConfigError(
            f"resume=true, but no earlier run of this command has a checkpoints/last.ckpt under "
            f"{cfg.output_root}/; pass ckpt_path=path/to/last.ckpt to continue another run"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def same_run_key(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in RESUME_KEYS)


def cli() -> None:
    """Console script `conceptlab-train`: the same as `python train.py` in a checkout."""
    import hydra

    from .config import register_configs

    register_configs()
    # Hydra finds a relative config_path beside the task function's module; ours lives in the repo.
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(main)()
