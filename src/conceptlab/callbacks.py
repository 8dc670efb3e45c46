"""Lightning callbacks: checkpoints, sample grids, the learned concept files, and the run's own statistics."""

from __future__ import annotations

import io
import logging
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .atomic import atomic_path
from .config import SamplesConfig
from .data import validation_batch
from .evalcache import backbone_identity, method_state
from .inference import labelled_grid, to_pil
from .module import diffusion_losses
from .prompts import fill_prompt
from .records import publish
from .runfolder import RunFolder
from .sampling import Draw, draw_images
from .smoothing import RunningEMA

# diffusers load inside the functions that use them, not here: importing them costs diffusers ~5 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their target and renamed over it: never a half-written last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class LastCheckpoint(pl.Callback):
    """checkpoints/last.ckpt every N optimizer steps and when training ends (the step a resume needs)."""

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = path, every_n_steps
        self.saved_step = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step not in (0, self.saved_step):
            # Called on every rank; rank zero writes, through AtomicCheckpointIO.
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR2 (SLURM's warning before a time limit or preemption): save last.ckpt at the next step
    boundary, then hand the signal to whoever owned it before (submitit, which requeues the job).

    conceptlab never requeues itself: one owner of requeue (Lightning's own SLURM requeue is off).
    """

    def __init__(self, checkpoint: LastCheckpoint, signum: int = signal.SIGUSR2):
        self.checkpoint, self.signum = checkpoint, signum
        self.requested = False
        self.previous = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(self.signum, self._request)

    def _request(self, signum, frame) -> None:
        log.warning("signal %s: saving last.ckpt at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # Every rank must agree, since saving a checkpoint involves them all.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.checkpoint.save(trainer)
        self.requested = False
        self._hand_over()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def _hand_over(self) -> None:
        previous, self.previous = self.previous, None
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(self.signum, None)  # submitit: requeue, then exit
        else:  # nobody requeues: stop here, checkpoint saved, run recorded as interrupted
            raise SystemExit(128 + self.signum)


class SampleGrid(pl.Callback):
    """A grid (rows: prompts, columns: seeds) at step 0, every N steps and at the end; saved and logged.
    With a SharedDraws (conceptlab.sampling) its images are drawn in one batch with the evaluators'."""

    def __init__(self, cfg: SamplesConfig, prompts: list[str], prompt_text: str, run: RunFolder, cache=None):
        self.cfg = cfg
        self.prompts = [fill_prompt(p, prompt_text) for p in prompts]
        self.run = run  # where the grids go: run.sample_grid(step)
        self.cache = cache  # an EvaluationCache: a grid of a state drawn before is read, not drawn again
        self.last_step = -1
        self.shared = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.render(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.render(trainer, module, "batch_end")

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.render(trainer, module, "end")

    def due(self, trainer: pl.Trainer, event: str) -> bool:
        every, step = self.cfg.every_n_steps, trainer.global_step
        if every <= 0 or step == self.last_step or not trainer.is_global_zero:
            return False
        return event != "batch_end" or step % every == 0

    @property
    def draw(self) -> Draw:
        pairs = [(prompt, seed) for prompt in self.prompts for seed in self.cfg.seeds]
        return Draw(
            tuple(p for p, _ in pairs), tuple(s for _, s in pairs), self.cfg.num_inference_steps,
            self.cfg.guidance_scale, self.cfg.negative_prompt,
        )  # fmt: skip

    def draws(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> list[Draw]:
        if not self.due(trainer, event) or self.cached(module)[1] is not None:
            return []
        return [self.draw]

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> None:
        if not self.due(trainer, event):
            return
        step = self.last_step = trainer.global_step
        key, png = self.cached(module)
        if png is None:
            images = draw_images(self, trainer, module, self.draw)
            png = grid_png(images, self.prompts, list(self.cfg.seeds))
            if key is not None:
                self.cache.put_bytes(key, ".png", png)
        path = self.run.sample_grid(step)
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)

        grid = Image.open(io.BytesIO(png))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                caption = (
                    f"rows: {' | '.join(self.prompts)}; columns: seeds {', '.join(map(str, self.cfg.seeds))}"
                )
                logger.log_image(key="samples", images=[grid], step=step, caption=[caption])

    def cached(self, module: pl.LightningModule) -> tuple[str | None, bytes | None]:
        """The cache key of the grid of this very state, and its PNG bytes when it was drawn before."""
        if self.cache is None:
            return None, None
        cfg = self.cfg
        key = self.cache.key(
            kind="sample-grid", backbone=backbone_identity(module.backbone), prompts=self.prompts,
            state=method_state(module.method, 1.0), seeds=list(cfg.seeds), steps=cfg.num_inference_steps,
            guidance=cfg.guidance_scale, negative=cfg.negative_prompt, sampler="DDIM", grid="labelled",
        )  # fmt: skip
        return key, self.cache.get_bytes(key, ".png")


def grid_png(images: torch.Tensor, prompts: list[str], seeds: list[int]) -> bytes:
    """Images in [0, 1], prompt after prompt (one per seed), as a labelled PNG grid a person can read:
    rows the prompts, columns the seeds, each image at least inference.MIN_CELL px."""
    buffer = io.BytesIO()
    labelled_grid(to_pil(images), prompts, [f"seed {s}" for s in seeds]).save(buffer, format="PNG")
    return buffer.getvalue()


class ConceptExport(pl.Callback):
    """Writes the method's concept files when training ends."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        module.check_finite()  # a diverged concept is never exported
        if trainer.is_global_zero:
            module.method.export(self.folder, trainer.global_step, module.backbone)


def evaluation_due(trainer: pl.Trainer, every: int, done_step: int, event: str) -> bool:
    """Whether an evaluation runs at `event` ("start", "batch_end", "end") of this step: at step 0, every
    `every` steps and at the end (the last step at its batch end, so its best step reaches the last
    checkpoint), once a step, on rank zero; `every` = 0: at the end only."""
    step = trainer.global_step
    if step == done_step or not trainer.is_global_zero:
        return False
    if event == "start":
        return every > 0
    return event == "end" or (every > 0 and step % every == 0) or step >= trainer.max_steps


class HeldOutLoss(pl.Callback):
    """data.val_images: the diffusion loss of the held-out images (val/loss) and of the training images
    (val/loss_seen) on fixed draws (`data.validation_batch`: the same timesteps and noise in every run),
    at the evaluation steps; to every logger and summary.json's metrics. The gap between the two is what
    the concept memorized."""

    CHUNK = 8  # samples per pass

    def __init__(self, record, every_n_steps: int, held_out: list, seen: list, data_cfg, prompt_text: str,
                 resolution: int):  # fmt: skip
        self.record, self.every = record, every_n_steps
        self.sets = {"val/loss": held_out, "val/loss_seen": seen}
        self.data_cfg, self.prompt_text, self.resolution = data_cfg, prompt_text, resolution
        self.batches: dict[str, dict[str, torch.Tensor]] = {}
        self.done_step = -1

    def on_train_start(self, trainer, module) -> None:
        self.measure(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.measure(trainer, module, "batch_end")

    def on_train_end(self, trainer, module) -> None:
        self.measure(trainer, module, "end")

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> None:
        if not evaluation_due(trainer, self.every, self.done_step, event):
            return
        step = self.done_step = trainer.global_step
        publish(trainer, self.record, step, {name: self.loss(module, name) for name in self.sets})

    def loss(self, module: pl.LightningModule, name: str) -> float:
        if name not in self.batches:
            cfg = self.data_cfg
            self.batches[name] = validation_batch(
                module.backbone, self.sets[name], cfg.templates, self.prompt_text, self.resolution,
                cfg.center_crop, module.device,
            )  # fmt: skip
        batch = self.batches[name]
        total, count = 0.0, batch["latents"].shape[0]
        with module.method.inference(1.0):
            for start in range(0, count, self.CHUNK):
                chunk = {
                    key: value[start : start + self.CHUNK].to(module.device) for key, value in batch.items()
                }
                size = chunk["latents"].shape[0]
                total += diffusion_losses(module.backbone, [chunk])[0].item() * size
        return total / count


class RunStats(pl.Callback):
    """Loss, speed and memory figures for the run record, reported by rank zero when training ends."""

    def __init__(self, record, job_started: float | None = None):
        self.record = record
        self.losses: list[torch.Tensor] = []
        self.started: float | None = None
        self.steps_at_start = 0
        self.job_started = job_started  # time.time() when the job began (imports excluded)
        self.first_step_at: float | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()
        self.steps_at_start = trainer.global_step
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())  # kept on the device: no host sync in the training loop
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.record.report(trainer, steps=trainer.global_step, **self.summary(trainer))

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        losses = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        steps = trainer.global_step - self.steps_at_start
        return {
            "final_loss": losses[-1] if losses else None,
            "smoothed_loss": RunningEMA().update(losses).value,
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "train_time_s": round(elapsed, 3),
            "steps_this_process": steps,
            "steps_per_s": round(steps / elapsed, 4) if elapsed > 0 else None,
            "peak_memory_mb": peak_memory_mb(),
            "time_to_first_step_s": round(self.first_step_at - self.job_started, 3)
            if self.first_step_at and self.job_started
            else None,
        }


def peak_memory_mb() -> dict[str, float]:
    """Peak host memory of this process (and peak CUDA memory when a GPU was used), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak
