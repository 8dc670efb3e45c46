"""One training run: compose -> backbone -> method -> data -> Lightning -> the run record."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from diffusers.optimization import SchedulerType
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .backbone import load_backbone, resolve_dtype, resolve_path
from .callbacks import (
    AtomicCheckpointIO,
    ConceptExport,
    HeldOutLoss,
    LastCheckpoint,
    PreemptionCheckpoint,
    RunStats,
    SampleGrid,
)
from .config import OPTIMIZERS, DataConfig, ModelConfig, TrainConfig, check_config
from .console import StepProgress, is_verbose, logging_around_bars, quiet_third_party, say
from .data import ConceptDataModule, read_concept_images, read_concept_split
from .errors import ConceptLabError, ConfigError, error_line
from .evalcache import EvaluationCache, default_cache_dir
from .loggers import make_loggers
from .methods import Method, registered_methods
from .module import ConceptModule
from .packing import Member, PackedConceptModule
from .records import RunRecord, package_versions
from .runfolder import (
    HYDRA_OVERRIDES,
    RunFolder,
    RunFolderRefused,
    check_checkpoint_safe,
    check_same_configuration,
    remove_stray_temporaries,
    run_folder_lock,
)
from .sampling import SharedDraws
from .schedules import scaled
from .sweeps import TRAINING_LOSS, is_search, search_problem, swept_values, wandb_group
from .sweeps import run_name as sweep_run_name
from .wandbmode import check_wandb_environment

# wandb load inside the functions that use them, not here: importing them costs wandb ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)
# Keys that say how (long) to run, not what to run: `resume=true` continues an earlier run whose
# command differed only in these (so a run can be resumed with a larger step budget).
RESUME_KEYS = ("resume", "ckpt_path", "trainer.max_steps")


def main(cfg: DictConfig, pack: Member | None = None) -> dict[str, Any] | float | str:
    """The Hydra task: train, and turn a user's mistake into one line on stderr and exit status 2. In a
    search (`hydra/sweeper=optuna`) it returns the run's metric to the sweeper, else the run's summary.

    pack: in a packed sweep, this job's member of the pack (the packed launcher passes it)."""

    quiet_third_party(verbose=is_verbose())
    try:
        summary = run(cfg, pack)
        return search_value(cfg, summary) if in_search() else summary
    except ConceptLabError as err:
        if not isinstance(err, RunFolderRefused):  # that folder's record belongs to the run it is
            say(f"run record: {Path(HydraConfig.get().runtime.output_dir) / 'summary.json'} (failed)")
        print(error_line(err), file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Said in one line and recorded: the sweep's other jobs go on, and the sweep exits non-zero at
            # its end (hydra_callbacks.SweepSummary), without Hydra's traceback of this job's error. To a
            # search the line itself: no number, so Optuna records the trial as failed.
            return error_line(err) if in_search() else {"status": "failed", "error": error_line(err)}
        sys.exit(2)
    except SystemExit as stop:
        if isinstance(stop, SIGTERMException):  # Lightning stops at the next step with a bare SystemExit
            say(f"run record: {Path(HydraConfig.get().runtime.output_dir) / 'summary.json'} (interrupted)")
            sys.exit(128 + signal.SIGTERM)  # what a process ended by SIGTERM reports, never success
        raise


def in_search() -> bool:
    """Whether this job is a trial of a search (`hydra/sweeper=optuna`): its task returns the run's metric."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and is_search(hydra_cfg.sweeper)


def search_metric(cfg: DictConfig, evidence: list[str]) -> str:
    """What a search optimizes: study.metric, else the evaluators' first evidence during training (the
    judge's concept score on model=toy), else the final training loss."""
    return cfg.study.metric or (evidence[0] if evidence else TRAINING_LOSS)


def check_search(cfg: DictConfig, evidence: list[str]) -> None:
    """A search measures its metric, and its direction agrees with the metric's goal (before anything loads)."""
    if in_search():
        metric = search_metric(cfg, evidence)
        direction = HydraConfig.get().sweeper.get("direction")
        problem = search_problem(metric, cfg.study.goal, direction, evaluated=bool(evidence))
        if problem:
            raise ConfigError(problem)


def search_value(cfg: DictConfig, summary: dict[str, Any]) -> float | str:
    """The run's value of the search's metric (its last evaluation's); where the run has none, a line
    saying so, which is no number: Optuna records the trial as failed (NaN would stop Optuna's sweeper)."""
    metric = search_metric(cfg, summary.get("evidence") or [])
    found = (
        summary.get("final_loss") if metric == TRAINING_LOSS else (summary.get("metrics") or {}).get(metric)
    )
    if not isinstance(found, int | float) or math.isnan(found):
        return f"the run has no {metric} to tell the search"
    return float(found)


def run(cfg: DictConfig, pack: Member | None = None) -> dict[str, Any]:
    """Train one concept with one method; returns the summary (also written to summary.json)."""

    if rank_zero_only.rank != 0:  # DDP ranks started by re-running the command: rank zero holds the folder
        return run_in_folder(cfg, pack)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_log = pack.job_log(run_dir, hydra_cfg.job.name) if pack else contextlib.nullcontext()
    with run_folder_lock(run_dir), job_log, logging_around_bars():
        remove_stray_temporaries(run_dir)
        folder = RunFolder(run_dir)
        if folder.checkpoint.is_file():  # this very job ran here before: only its own configuration goes on
            check_same_configuration(folder.checkpoint, OmegaConf.to_container(cfg, resolve=True), run_dir)
        folder.write_hydra_record(cfg, hydra_cfg)  # once the folder is this run's (nothing written before)
        return run_in_folder(cfg, pack)


def run_in_folder(cfg: DictConfig, pack: Member | None = None) -> dict[str, Any]:
    record = start_record(cfg)
    try:
        fit(cfg, record, pack)
    except BaseException as err:
        record.finish("interrupted" if isinstance(err, KeyboardInterrupt | SystemExit) else "failed", err)
        if record.summary.sweep_dir and rank_zero_only.rank == 0:
            say(job_line(record))
        raise
    record.finish("completed")
    if rank_zero_only.rank == 0:  # the other ranks' records hold no training statistics
        say(job_line(record) if record.summary.sweep_dir else end_summary(record))
    return record.data


def scores_line(record: RunRecord, before: bool = True) -> str:
    """The headline scores, `before -> after` where the run evaluated more than once."""
    summary = record.summary
    parts = []
    for key in summary.headline:
        after, first = summary.metrics.get(key), summary.metrics_at_start.get(key)
        if isinstance(after, float | int):
            shown = (
                f"{first:.2f} -> {after:.2f}" if before and isinstance(first, float | int) else f"{after:.2f}"
            )
            parts.append(f"{key} {shown}")
    return " · ".join(parts)


def job_line(record: RunRecord) -> str:
    """One line per finished job of a sweep: its name, status and headline."""
    s = record.summary
    headline = scores_line(record, before=False) or (
        f"loss (EMA) {s.smoothed_loss:.4f}" if s.smoothed_loss is not None else ""
    )
    status = s.status if s.status == "completed" else f"{s.status}: {s.error}"
    return f"[{Path(s.run_dir).name}] {s.run_name or s.method}: {status}" + (
        f" · {headline}" if headline else ""
    )


def end_summary(record: RunRecord) -> str:
    """What a finished run did and where its results are, with the command that uses them."""
    s = record.summary
    run_dir = Path(s.run_dir)
    # The loss as the progress bar showed it: smoothed (one step's loss jumps with its timestep).
    loss = f" · loss (EMA) {s.smoothed_loss:.4f}" if s.smoothed_loss is not None else ""
    lines = [f"conceptlab: {s.status} in {s.wall_time_s:.0f} s · {s.steps} steps{loss}"]
    if scores_line(record):
        lines.append(f"  {scores_line(record)}")
    concept_files = [run_dir / f for f in s.files.get("concepts", [])]
    lines.append(f"  run: {run_dir}")
    if concept_files:
        lines.append(f"  concept files: {', '.join(str(f) for f in concept_files)}")
        entry = "conceptlab-generate"
        if Path(sys.argv[0]).name == "train.py":  # a checkout: the script beside the one that ran
            entry = f"python {Path(sys.argv[0]).with_name('generate.py')}"
        # The run's own model overrides, so the command generates with the backbone that trained.
        model = [o for o in s.overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "model"]
        prompt = (s.example_prompt or "").replace("'", "")
        args = " ".join(f"'{a}'" for a in [f"prompt={prompt}", f"concepts=[{run_dir}]", *model])
        lines.append(f"  use them: {entry} {args}")
    offline = sorted(RunFolder(run_dir).wandb.glob("offline-run-*"))
    if offline:
        lines.append(f"  W&B (offline): wandb sync {offline[-1]}")
    return "\n".join(lines)


def fit(cfg: DictConfig, record: RunRecord, pack: Member | None = None) -> None:
    """The run, part by part: checks, data, backbone, method, trainer, training, the record."""

    run_dir, concept = record.run_dir, record.summary.concept
    check_settings(cfg, concept)
    ckpt_path = find_resume_checkpoint(cfg, run_dir, record.summary.overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # Cheap checks first: a bad image folder or evaluator setting fails before any model loads.
    evaluators = make_evaluators(cfg, record)
    check_search(cfg, [e.evidence for e in evaluators if getattr(e, "evidence", None)])
    images, held_out = read_concept_split(cfg.data)
    method = make_method(cfg, concept)  # its own checks, before any model loads
    joint = [(s, read_concept_images(OmegaConf.merge(cfg.data, {"path": s.path, "val_images": 0, "mask": None})))
             for s in method.joint_sets]  # fmt: skip
    # In a packed sweep: this job's copy of the pack's backbone (its own modules, the pack's weights).
    backbone = pack.backbone(cfg.model, method) if pack is not None else load_backbone(cfg.model)
    method.attach(backbone)
    resolution = cfg.data.resolution or backbone.native_resolution
    # Results computed once for every run (evaluate.cache): class images here, sample grids below.
    cache = EvaluationCache(default_cache_dir(cfg.model.cache_dir)) if cfg.evaluate.cache else None
    # Other concepts trained jointly (Custom Diffusion's): their images with their own words and class images.
    texts = [method.prompt_text] * len(images) + [s.prompt_text for s, more in joint for _ in more]
    priors = list(
        {p.prompt: p for p in [method.prior, *(s.prior for s, _ in joint)] if p is not None}.values()
    )
    data = ConceptDataModule(
        cfg.data, images + [im for _, more in joint for im in more], backbone,
        texts if joint else method.prompt_text, cfg.seed, resolution,
        cache_context=not method.changes_text_encoding, memo=pack.data_memo if pack is not None else None,
        noise_offset=cfg.optim.noise_offset, snr_gamma=cfg.optim.snr_gamma,
        prior=priors, prior_draw=BareDraw(backbone, method) if priors else None, cache=cache,
    )  # fmt: skip
    record.update(
        headline=[key for e in evaluators for key in getattr(e, "headline", ())],
        evidence=[e.evidence for e in evaluators if getattr(e, "evidence", None)],
        example_prompt=method.usage(list(cfg.data.sample_prompts)[0]),
    )
    # Evaluators first: what they record at a step (the best step) is in the checkpoint of that step.
    validation = held_out_loss(cfg, record, held_out, images, method.prompt_text, resolution)
    callbacks = validation + evaluators + run_callbacks(cfg, record, method, cache, in_pack=pack is not None)
    trainer = make_trainer(cfg, record, shared_draws(callbacks) + callbacks, in_pack=pack is not None)
    module = make_module(cfg, trainer, backbone, method, record, pack)
    if pack is None:  # a pack's jobs start together: the pack says so once, and draws their one bar
        say(
            f"conceptlab: {cfg.method.name} on {concept} · model={cfg.model.name} · {cfg.trainer.max_steps} steps · "
            f"{trainer.strategy.root_device.type} · {trainer.precision} -> {run_dir}"
        )
    else:
        pack.record = record  # the pack's bar shows the best score so far among its jobs
    record.update(
        num_images=len(images), images=[str(im.path) for im in images], resolution=resolution,
        held_out_images=[str(im.path) for im in held_out],
        joint=[{"words": s.prompt_text, "path": s.path, "images": [str(im.path) for im in more]} for s, more in joint],
        buckets=data.bucket_counts() if cfg.data.buckets else None,
        resumed_from=str(ckpt_path) if ckpt_path else None,
        trainable_params=sum(p.numel() for p in method.trainable_parameters()),
        snr_gamma=cfg.optim.snr_gamma, noise_offset=cfg.optim.noise_offset,
        masked_images=sum(im.mask is not None for im in images) if cfg.data.mask else None,
        ema_decay=cfg.ema.decay,
    )  # fmt: skip
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
        # weights_only explicitly: a checkpoint never runs code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
        try:
            trainer.fit(
                module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
            )
        except BaseException:
            finish_wandb(trainer, None)  # the job's W&B run ends failed (the next job gets a run of its own)
            raise
    record.collect(trainer)
    record.update(files=run_files(record))
    finish_wandb(trainer, record.data)


def start_record(cfg: DictConfig) -> RunRecord:
    """The run record, written at once: what runs, where, with which overrides and swept values."""

    hydra_cfg = HydraConfig.get()
    return RunRecord(
        Path(hydra_cfg.runtime.output_dir),
        method=cfg.method.name,
        concept=cfg.concept or concept_name(cfg.data.path),
        model=cfg.model.name,
        overrides=list(hydra_cfg.overrides.task),
        swept=swept_values(hydra_cfg),
        study=cfg.study.name,
        sweep_dir=str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None,
        seed=cfg.seed,
        max_steps=cfg.trainer.max_steps,
    )


def concept_name(data_path: str) -> str:
    name = Path(data_path.removeprefix("bundled:")).expanduser().name
    return name or "concept"


# A concept names files (<concept>.safetensors, written through .<name>.<12 hex>.tmp): with the longest
# suffix, a name this long stays within the 255 bytes file systems allow.
MAX_CONCEPT_NAME = 200


def check_settings(cfg: DictConfig, concept: str) -> None:
    """Every value in its range, before anything loads (the value as given, and what is valid)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", concept):
        raise ConfigError(
            f"concept={concept!r}: use letters, digits, '.', '_' and '-' (it names the concept files)"
        )
    if len(concept) > MAX_CONCEPT_NAME:
        raise ConfigError(
            f"concept={concept[:20]}... is {len(concept)} characters: at most {MAX_CONCEPT_NAME} (it names "
            "files, and file systems allow 255 bytes a name)"
        )
    method = registered_methods().get(cfg.method.name)
    schemas = [("", TrainConfig), ("model.", ModelConfig), ("data.", DataConfig)]
    check_config(cfg, schemas + ([("method.", method.Config)] if method else []))
    compile_mode(cfg.trainer.compile)
    schedulers = [s.value for s in SchedulerType]
    if cfg.optim.scheduler not in schedulers:
        raise ConfigError(f"optim.scheduler={cfg.optim.scheduler!r}: use one of {', '.join(schedulers)}")
    if cfg.logger.wandb:
        check_wandb_environment()  # before anything loads: W&B would refuse the run over its environment
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)}: give two, e.g. [0.9,0.999]")
    check_optimizer(cfg)


def check_optimizer(cfg: DictConfig) -> None:
    """optim.name is one we build, and where it runs: bitsandbytes' 8-bit AdamW needs a CUDA device."""
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.optim.name == "adamw8bit" and (not torch.cuda.is_available() or cfg.trainer.accelerator == "cpu"):
        raise ConfigError(
            "optim.name=adamw8bit: bitsandbytes' 8-bit AdamW runs on a CUDA GPU and this run has none; "
            "use optim.name=adamw (or adafactor) on the CPU"
        )
    if cfg.optim.name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optim.name=adamw8bit: bitsandbytes is not installed; pip install bitsandbytes (the gpu extra: pip install -e '.[gpu]')"
        )


def make_evaluators(cfg: DictConfig, record: RunRecord) -> list:
    """The evaluation callbacks the config selects (`evaluators` group), each given the schedule
    (`evaluate`), the data config and the run record to report to."""
    if not cfg.evaluate.enabled:
        return []
    return [
        instantiate_checked(spec, settings=cfg.evaluate, data=cfg.data, record=record)
        for spec in cfg.evaluators.values()
    ]


class BareDraw:
    """Images of prompts at seeds from the backbone without the method (at multiplier 0 where it has one;
    before training the method has learned nothing): the class images of prior preservation. A class, not
    a closure: the data module travels to DDP's spawned processes by pickle."""

    def __init__(self, backbone, method):
        self.backbone, self.method = backbone, method

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        spec = self.method.prior
        with self.method.inference(0.0 if self.method.has_multiplier else None):
            return self.backbone.sample(prompts, seeds, spec.steps, spec.guidance, progress="class images")


def held_out_loss(cfg: DictConfig, record: RunRecord, held_out: list, images: list, prompt_text: str,
                  resolution: int) -> list:  # fmt: skip
    """The validation loss where data.val_images holds images out (evaluate.enabled): on them and on as
    many training images (at least 4), at the evaluation steps."""
    if not held_out or not cfg.evaluate.enabled:
        return []
    seen = images[: max(4, len(held_out))]
    return [
        HeldOutLoss(record, cfg.evaluate.every_n_steps, held_out, seen, cfg.data, prompt_text, resolution)
    ]


def shared_draws(callbacks: list) -> list:
    """A SharedDraws for the callbacks that sample (evaluators, the sample grid) when there are several:
    what they draw at a step is sampled in one batch per sampler (conceptlab.sampling)."""
    users = [c for c in callbacks if hasattr(c, "draws")]
    return [SharedDraws(users)] if len(users) > 1 else []


def make_method(cfg: DictConfig, concept: str) -> Method:
    """The configured method for this concept (not yet attached to a backbone)."""
    return instantiate_checked(cfg.method, concept=concept)


def instantiate_checked(spec, **kwargs):
    """hydra.utils.instantiate, with a conceptlab error raised by the object itself passed on as it is."""
    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConceptLabError):  # the object's own check, not Hydra's wrapper
            raise err.__cause__ from None
        raise


def run_callbacks(cfg: DictConfig, record: RunRecord, method, cache: EvaluationCache | None,
                  in_pack: bool = False) -> list:  # fmt: skip
    """Checkpoints, preemption, sample grids (read from `cache` where drawn before), the concept files,
    speed figures and the record itself."""
    run_dir = record.run_dir
    folder = RunFolder(run_dir)
    last = LastCheckpoint(folder.checkpoint, cfg.checkpoint.every_n_steps)
    stats = RunStats(record, job_started=record.started)
    progress = StepProgress(record, enabled=not in_pack, stats=stats)  # the same smoothed loss as the end's
    return [
        last,
        PreemptionCheckpoint(last),
        SampleGrid(cfg.samples, list(cfg.data.sample_prompts), method.prompt_text, folder, cache),
        ConceptExport(folder.concepts),
        stats,
        record,
        *([progress] if cfg.trainer.enable_progress_bar else []),
    ]


def make_trainer(cfg: DictConfig, record: RunRecord, callbacks: list, in_pack: bool = False):
    """Lightning's Trainer with conceptlab's loggers, checkpoint I/O and (under SLURM) environment."""

    swept = record.summary.swept
    # The method group's option names the run (method=loha: LoRA's LoHa variant), else the method.
    label = HydraConfig.get().runtime.choices.get("method") or cfg.method.name
    run_name = cfg.logger.name or sweep_run_name(label, record.summary.concept, cfg.seed, swept)
    record.update(run_name=run_name)
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # submitit owns requeue, not Lightning
    loggers = make_loggers(
        cfg.logger, record.run_dir, run_name, OmegaConf.to_container(cfg, resolve=True),
        group=wandb_group(cfg.logger.group, cfg.study.name, record.summary.sweep_dir), job_type=cfg.method.name,
        tags=[f"{k}={v}" for k, v in swept.items()], in_pack=in_pack, evidence=record.summary.evidence,
    )  # fmt: skip
    try:
        return pl.Trainer(
            **trainer_kwargs(cfg, in_sweep=record.summary.sweep_dir is not None),
            max_epochs=-1,
            default_root_dir=str(record.run_dir),
            logger=loggers,
            callbacks=callbacks,
            plugins=plugins,
            enable_checkpointing=False,  # LastCheckpoint owns checkpoints/last.ckpt
        )
    except (MisconfigurationException, ValueError) as err:
        raise ConfigError(f"trainer: {err}") from err


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(setting: Any) -> str | None:
    """trainer.compile as a torch.compile mode (None: not compiled); a one-line error otherwise."""
    if setting in (False, None):
        return None
    mode = "default" if setting is True else str(setting)
    if mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile={setting}: use true, false or one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_unet(backbone, setting: Any) -> None:
    """trainer.compile: the UNet (with whatever a method installed in it) compiled in place, so its
    parameter names, checkpoints and exports stay as they are."""
    mode = compile_mode(setting)
    if mode is not None:
        backbone.unet.compile(mode=mode)


def make_module(cfg: DictConfig, trainer, backbone, method, record: RunRecord, pack: Member | None = None):
    """The LightningModule: the backbone in its training dtype, the method's learning-rate schedule; in a
    packed sweep the module whose steps go through the pack's shared pass."""
    dtype = resolve_dtype(cfg.model.dtype, trainer.strategy.root_device, trainer.precision)
    if dtype != backbone.unet.dtype:
        backbone.to(dtype)
    for parameter in method.trainable_parameters():  # what trains stays float32, whatever the backbone
        parameter.data = parameter.data.float()
    if cfg.trainer.gradient_checkpointing:
        # The UNet's blocks recomputed in the backward, and the text encoder's where the gradient passes
        # through it (the method says how its modules take it).
        method.enable_gradient_checkpointing(backbone)
    compile_unet(backbone, cfg.trainer.compile)
    schedule = method.lr_schedule
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
    record.update(
        global_batch_size=global_batch,
        lr=schedule[0][0],
        lr_schedule=", ".join(f"{rate:g}:{until}" if until else f"{rate:g}" for rate, until in schedule),
    )
    run_info = {"config": OmegaConf.to_container(cfg, resolve=True), "versions": package_versions()}
    parts = (backbone, method, cfg.optim, schedule, cfg.trainer.max_steps, run_info)
    ema = {"ema_decay": cfg.ema.decay, "ema_start_step": cfg.ema.start_step}
    return ConceptModule(*parts, **ema) if pack is None else PackedConceptModule(pack, *parts, **ema)


def run_files(record: RunRecord) -> dict[str, Any]:
    """The files the run left, relative to its directory."""
    folder = RunFolder(record.run_dir)
    checkpoint, metrics = folder.checkpoint, folder.metrics
    return {
        "checkpoint": record.relative(checkpoint) if checkpoint.is_file() else None,
        "concepts": sorted(
            record.relative(p)
            for p in folder.concepts.rglob("*")
            if p.is_file() and not p.is_relative_to(folder.steps)
        ),
        "concepts_by_step": record.relative(folder.steps) if folder.steps.is_dir() else None,
        "samples": sorted(record.relative(p) for p in folder.samples.glob("*.png")),
        "metrics": record.relative(metrics) if metrics.is_file() else None,
    }


def trainer_kwargs(cfg: DictConfig, in_sweep: bool) -> dict[str, Any]:
    """cfg.trainer for Lightning, with `ddp` made safe inside a local sweep.

    Lightning's `ddp` starts ranks >= 1 by re-running the command line, which under `-m` would start
    a new sweep. Ranks started from outside (SLURM tasks, torchrun) are fine; otherwise a job of a
    local sweep uses `ddp_spawn`, whose ranks are started inside the job.
    """
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for own in ("compile", "gradient_checkpointing"):  # conceptlab's own (make_module), not the Trainer's
        kwargs.pop(own, None)
    started_outside = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if in_sweep and kwargs.get("strategy") == "ddp" and not started_outside:
        log.info("trainer.strategy=ddp inside a local sweep: using ddp_spawn (ddp would re-run the sweep)")
        kwargs["strategy"] = "ddp_spawn"
    return kwargs


def finish_wandb(trainer, summary: dict[str, Any] | None) -> None:
    """The job's W&B run (if it logs to W&B), finished: with the final metrics in its summary and a
    one-row table when the job completed (`summary`), as failed otherwise."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):  # started by make_wandb_logger
            import wandb

            run = logger.experiment
            if summary is None:
                run.finish(exit_code=1)
                continue
            final = {
                k: summary.get(k)
                for k in ("final_loss", "smoothed_loss", "mean_loss", "steps_per_s", "steps", "lr")
            }
            # The evaluators' scores are in the summary already, as their logged history leaves them (the
            # evidence's best and last value: loggers.define_summaries); the table shows their last.
            run.summary.update(final)
            final.update({k: v for k, v in (summary.get("metrics") or {}).items() if k != "step"})
            run.log({"final_metrics": wandb.Table(columns=list(final), data=[list(final.values())])})
            run.finish()


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path | None:
    """This run directory's own last.ckpt (a requeued job), `ckpt_path`, or with `resume=true` the
    newest last.ckpt of an earlier run of the same command."""
    own = RunFolder(run_dir).checkpoint
    if own.is_file():
        # This very job ran before: requeued on SLURM, or a rerun into a fixed hydra.run.dir; it must
        # be the same configuration (another seed or rate would silently continue the old run).
        check_same_configuration(own, OmegaConf.to_container(cfg, resolve=True), run_dir)
        log.info("continuing this run from %s", own)
        return own
    if cfg.ckpt_path:
        path = resolve_path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist")
        try:
            check_checkpoint_safe(path)
        except ConceptLabError as err:
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {err}") from None
        return path
    if not cfg.resume:
        return None
    wanted = same_run_key(overrides)
    found = []
    unreadable = []
    for saved in Path(cfg.output_root).glob(f"**/{HYDRA_OVERRIDES}"):
        candidate = RunFolder(saved.parent.parent).checkpoint
        if saved.parent.parent.resolve() != run_dir.resolve() and candidate.is_file():
            try:
                overrides_there = yaml.safe_load(saved.read_text(encoding="utf-8")) or []
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                unreadable.append(str(saved))  # another run's damaged record: not this command's, said once
                continue
            if isinstance(overrides_there, list) and same_run_key(overrides_there) == wanted:
                found.append(candidate)
    if unreadable:
        log.warning("resume=true: %d earlier run record(s) could not be read and were passed over: %s",
                    len(unreadable), ", ".join(unreadable))  # fmt: skip
    if not found:
        raise ConfigError(
            f"resume=true, but no earlier run of this command has a checkpoints/last.ckpt under "
            f"{cfg.output_root}/; pass ckpt_path=path/to/last.ckpt to continue another run"
        )
    newest = max(found, key=lambda p: p.stat().st_mtime)
    check_checkpoint_safe(newest)
    done = int(torch.load(newest, map_location="cpu", weights_only=True).get("global_step", 0))
    if done >= cfg.trainer.max_steps:
        raise ConfigError(
            f"resume=true: the newest earlier run of this command ({newest.parent.parent}) already reached "
            f"trainer.max_steps={cfg.trainer.max_steps} (step {done}); give a larger trainer.max_steps to continue it"
        )
    return newest


def same_run_key(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in RESUME_KEYS)
