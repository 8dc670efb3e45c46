"""The LightningModule: the latent-diffusion loss over a frozen backbone and one trainable method.

Nothing here knows which method trains: it optimizes `method.trainable_parameters()` and checkpoints
exactly what trains (the method's own tensors and any backbone part it unfroze: kilobytes for an
embedding), never the frozen weights, which come from the model's own folder.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch import nn

from .backbone import Backbone
from .config import OptimConfig
from .errors import TrainingError
from .methods.base import Method
from .schedules import rate_at

Route = Callable[[list[int], list[int]], AbstractContextManager]


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def diffusion_losses(
    backbone: Backbone, batches: list[dict[str, torch.Tensor]], route: Route | None = None
) -> list[torch.Tensor]:
    """The latent-diffusion loss of each batch, all of them in one text-encoder pass (for batches without
    cached contexts) and one UNet pass. `route(which, sizes)`, entered around each pass, is told which
    batches it holds and their sizes (so a caller can send each batch's rows through modules of its own)."""
    route = route or (lambda which, sizes: nullcontext())
    contexts = [batch.get("context") for batch in batches]
    # Methods that leave the text encoding alone get contexts cached by the data module.
    to_encode = [k for k, batch in enumerate(batches) if "context" not in batch]
    if to_encode:
        ids = [batches[k]["input_ids"] for k in to_encode]
        sizes = [i.shape[0] for i in ids]
        with route(to_encode, sizes):
            encoded = backbone.encode_text(_joined(ids))
        for k, context in zip(to_encode, encoded.split(sizes)):
            contexts[k] = context
    latents, noise, timesteps = (
        _joined([batch[key] for batch in batches]) for key in ("latents", "noise", "timesteps")
    )
    sizes = [batch["latents"].shape[0] for batch in batches]
    scheduler = backbone.scheduler
    dtype = backbone.unet.dtype  # once: diffusers finds it by walking the modules
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = _joined([c.to(dtype) for c in contexts])
    # SDXL's size conditioning: each image's own where the data module gives it, else the latents' size.
    time_ids = None
    if backbone.is_xl:
        time_ids = _joined(
            [b["time_ids"] if "time_ids" in b else backbone.size_ids(b["latents"]) for b in batches]
        )
    with route(list(range(len(batches))), sizes):
        prediction = backbone.denoise(noisy.to(dtype), timesteps, context, time_ids)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return [
        weighted_mse(p.float(), t.float(), batch.get("loss_weight"), batch.get("loss_mask"))
        for p, t, batch in zip(prediction.split(sizes), target.split(sizes), batches)
    ]


def weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean squared error. With a mask [batch, 1, h, w] (data.mask) each pixel's error is multiplied by
    it (a pixel at 0 gives no gradient) and averaged over every pixel, as kohya's masked loss does; with a
    weight per sample (min-SNR-γ) each sample's mean error is multiplied by it, then averaged over the batch
    (as the diffusers and kohya scripts weight it)."""
    if weight is None and mask is None:
        return F.mse_loss(prediction, target)
    error = F.mse_loss(prediction, target, reduction="none")
    if mask is not None:
        error = error * mask.to(error)
    per_sample = error.flatten(1).mean(1)
    return (per_sample if weight is None else per_sample * weight.to(per_sample)).mean()


def make_optimizer(optim: OptimConfig, params: list, lr: float) -> torch.optim.Optimizer:
    """optim.name's optimizer over `params` (tensors, or torch's parameter groups with rates of their own;
    each optimizer from its own library, loaded only when chosen)."""
    betas, eps, decay = tuple(optim.betas), optim.eps, optim.weight_decay
    if optim.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    if optim.name == "adafactor":
        from transformers.optimization import Adafactor

        # The given rate as it is (no relative step, no parameter scaling): a rate like every other's.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay)  # fmt: skip
    if optim.name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)


class WeightAverage(nn.Module):
    """An exponential moving average of the trained tensors (ema.decay): after each optimizer step u,
    average = weights while u <= ema.start_step, else decay x average + (1 - decay) x weights. Its tensors
    (and the step count) are buffers, so checkpoints keep them beside the weights and a run resumes with
    them. `use` puts the average in the weights' place until `restore` (the module does both)."""

    def __init__(self, params: list[nn.Parameter], decay: float, start_step: int):
        super().__init__()
        self.params, self.decay, self.start_step = params, decay, start_step
        for k, p in enumerate(params):
            self.register_buffer(f"average_{k}", p.detach().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.raw: list[torch.Tensor] | None = None  # the weights while the average stands in for them

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"average_{k}") for k in range(len(self.params))]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        copying = int(self.updates) <= self.start_step  # one read of the count a step, not one a tensor
        for average, p in zip(self.averages(), self.params):
            if copying:
                average.copy_(p)
            else:
                average.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def use(self) -> None:
        if self.raw is None:
            self.raw = [p.detach().clone() for p in self.params]
            for average, p in zip(self.averages(), self.params):
                p.copy_(average)

    @torch.no_grad()
    def restore(self) -> None:
        if self.raw is not None:
            for raw, p in zip(self.raw, self.params):
                p.copy_(raw)
            self.raw = None


class ConceptModule(pl.LightningModule):
    def __init__(self, backbone: Backbone, method: Method, optim: OptimConfig,
                 lr_schedule: list[tuple[float, int | None]], max_steps: int,
                 run_info: dict[str, Any] | None = None, ema_decay: float | None = None,
                 ema_start_step: int = 0):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.method = method
        # ema.decay: sampling, evaluation, checkpoints of the best step and the exported files read the
        # average, which stands in for the weights from each optimizer step until the next training step.
        self.ema = (
            WeightAverage(method.trainable_parameters(), ema_decay, ema_start_step) if ema_decay else None
        )
        self.optim = optim
        self.lr_schedule = lr_schedule  # effective rates (after scale_lr) and the steps they hold until
        self.lr = lr_schedule[0][0]
        self.max_steps = max_steps
        self.run_info = run_info or {}
        # Checkpoints hold what trains only; the frozen backbone comes from its own folder.
        self.strict_loading = False
        self._resume_rng: dict[str, Any] | None = None  # a checkpoint's random state, until the first step
        self._first_bad_step: torch.Tensor | None = (
            None  # on the device: the first step whose loss was not finite
        )

    def trained_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint holds: the method's state and every parameter that trains."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        averages = {f"ema.{name}" for name, _ in self.ema.named_buffers()} if self.ema is not None else set()
        return trainable | averages | set(self.method.state_dict(prefix="method."))

    def step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The diffusion loss of one batch (a subclass may compute it elsewhere, as one of many); with
        prior preservation, the concept's loss plus the method's weight times the class images' (`prior_`
        keys), both in one pass."""
        prior = {k.removeprefix("prior_"): v for k, v in batch.items() if k.startswith("prior_")}
        if not prior:
            return diffusion_losses(self.backbone, [batch])[0]
        own = {k: v for k, v in batch.items() if not k.startswith("prior_")}
        loss, prior_loss = diffusion_losses(self.backbone, [own, prior])
        return loss + self.method.prior.weight * prior_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.ema is not None:
            self.ema.restore()  # training goes on from the weights, not from their average
        self.method.before_step(self.global_step)
        loss = self.step_loss(batch)
        # No host sync in the step: a non-finite loss marks a device flag (the first such step), which
        # is read at logging points, before any checkpoint and before the concept is exported.
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        unseen = self._first_bad_step < 0
        self._first_bad_step = torch.where(bad & unseen, self.global_step, self._first_bad_step)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=batch["latents"].shape[0],
        )
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update()
            self.ema.use()  # what the step's callbacks sample, score and export

    def configure_optimizers(self):
        groups = [
            {"params": params, "lr": self.lr * factor} for params, factor in self.method.parameter_groups()
        ]
        optimizer = make_optimizer(self.optim, groups, self.lr)
        if len(self.lr_schedule) > 1:  # an AUTOMATIC1111 step schedule
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: rate_at(self.lr_schedule, step) / self.lr_schedule[0][0]
            )
        else:
            schedule = get_scheduler(
                self.optim.scheduler,
                optimizer,
                num_warmup_steps=self.optim.warmup_steps,
                num_training_steps=self.max_steps,
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # a diverged state never replaces the last good checkpoint
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.ema is not None and self.ema.raw is not None:  # the weights themselves, not their average
            names = {id(p): name for name, p in self.named_parameters()}
            for p, raw in zip(self.ema.params, self.ema.raw):
                checkpoint["state_dict"][names[id(p)]] = raw.clone()
        checkpoint["conceptlab"] = self.run_info
        # The random state the next step draws from (dropout masks): a resumed run is the run it resumes.
        # The data stream needs none: every sample is a function of (seed, position).
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def check_finite(self) -> None:
        """Stop if a step's loss was nan or inf (one host sync: called at logging points and before
        anything is written, so a diverged state is never checkpointed or exported)."""
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step)
        if step >= 0:
            raise TrainingError(
                f"the loss became nan or inf at step {step}; lower method.lr (now {self.lr:g}), or use "
                "trainer.precision=32-true / model.dtype=float32 if half precision overflowed"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer is not None and self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.check_finite()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng, self._resume_rng = self._resume_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied just before the first resumed step: what Lightning does in between (starting the data
        # loader draws a seed) would otherwise shift the stream.
        self._resume_rng = checkpoint.get("rng")
        ours = self.trained_state_keys()
        theirs = set(checkpoint.get("state_dict", {}))
        if ours != theirs:
            shown = sorted(theirs)[:4] + (["..."] if len(theirs) > 4 else [])
            raise TrainingError(
                f"the checkpoint holds {shown or 'no method tensors'} but this run trains "
                f"{len(ours)} other tensors: it was written by another method or configuration"
            )
        state = self.state_dict()
        for key, value in checkpoint["state_dict"].items():
            expected = state[key].shape
            if value.shape != expected:
                raise TrainingError(
                    f"checkpoint tensor {key} has shape {tuple(value.shape)} but this run needs "
                    f"{tuple(expected)} (another num_vectors or model?)"
                )
