"""Images drawn for evaluation during training, once per step for every callback that reads them.

The evaluators (the `evaluators` group) and the sample grid sample at the same steps (step 0, every N
steps, the end). Drawn one callback after another, small batches (a grid's four images) cost on a CPU
two to three times as much per image as a batch of 48. `SharedDraws`, first among the callbacks, asks
each of them what it will draw at this point (`draws`: what its cache does not hold), samples
everything that shares a sampler and a multiplier in one batched call, and each callback then takes
its own images (`take`) when its hook runs. An image depends only on its prompt, seed, sampler and the
learned state (a generator per seed, a deterministic DDIM): a callback gets the images it would have
drawn alone, up to floating-point rounding of a larger batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pytorch_lightning as pl
import torch

from .console import bar_text


@dataclass(frozen=True)
class Draw:
    """Images a callback samples: texts[i] at seeds[i], with one sampler, the method at `multiplier`."""

    texts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    negative: str = ""
    multiplier: float = 1.0  # training keeps every method at 1.0: the same as its inference default

    @property
    def sampler(self) -> tuple[int, float, str, float]:
        return (self.steps, self.guidance, self.negative, self.multiplier)


class DrawUser(Protocol):
    shared: SharedDraws | None

    def draws(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> list[Draw]:
        """What this callback will sample at `event` ("start", "batch_end", "end") of the current step
        and does not find in its cache."""
        ...


class SharedDraws(pl.Callback):
    """Draws what `users` will sample at a step in one batched call per sampler and multiplier; it goes
    before them in the trainer's callback list (Lightning calls a hook on callbacks in list order)."""

    def __init__(self, users: list[DrawUser]):
        self.users = users
        for user in users:
            user.shared = self
        self.step = -1
        self.drawn: dict[tuple, torch.Tensor] = {}

    def on_train_start(self, trainer, module) -> None:
        self.prepare(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.prepare(trainer, module, "batch_end")

    def on_train_end(self, trainer, module) -> None:
        self.prepare(trainer, module, "end")

    def teardown(self, trainer, module, stage: str) -> None:
        self.step, self.drawn = -1, {}

    @torch.no_grad()
    def prepare(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.global_step != self.step:  # what was drawn at an earlier step is stale
            self.step, self.drawn = trainer.global_step, {}
        wanted: dict[tuple, dict[tuple[str, int], None]] = {}
        for user in self.users:
            for draw in user.draws(trainer, module, event):
                pairs = wanted.setdefault(draw.sampler, {})
                for pair in zip(draw.texts, draw.seeds):
                    if (*draw.sampler, *pair) not in self.drawn:
                        pairs[pair] = None
        for sampler, pairs in wanted.items():
            if pairs:
                batch = Draw(tuple(text for text, _ in pairs), tuple(seed for _, seed in pairs), *sampler)
                images = sample_draw(
                    module.backbone,
                    module.method,
                    batch,
                    progress=bar_text(trainer, f"sampling step {self.step}"),
                )
                self.drawn.update({(*sampler, *pair): image for pair, image in zip(pairs, images)})

    def take(self, trainer: pl.Trainer, draw: Draw) -> torch.Tensor | None:
        """The images of `draw` if they were drawn at this step, else None."""
        if trainer.global_step != self.step:
            return None
        keys = [(*draw.sampler, text, seed) for text, seed in zip(draw.texts, draw.seeds)]
        if not all(key in self.drawn for key in keys):
            return None
        return torch.stack([self.drawn[key] for key in keys])


def draw_images(
    user: DrawUser, trainer: pl.Trainer, module: pl.LightningModule, draw: Draw, progress: str | None = None
) -> torch.Tensor:
    """The images of `draw` in [0, 1]: drawn already by the user's SharedDraws, or sampled now."""
    images = user.shared.take(trainer, draw) if user.shared is not None else None
    return sample_draw(module.backbone, module.method, draw, progress) if images is None else images


def sample_draw(backbone, method, draw: Draw, progress: str | None = None) -> torch.Tensor:
    """The images of `draw` in [0, 1], sampled now (the method in inference mode at the draw's multiplier)."""
    with method.inference(draw.multiplier):
        return backbone.sample(
            list(draw.texts), list(draw.seeds), draw.steps, draw.guidance, draw.negative, progress=progress
        )  # fmt: skip
