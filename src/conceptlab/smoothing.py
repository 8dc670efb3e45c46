"""The training loss as a person reads it: a per-step loss jumps with the timestep each step draws, so
the progress bar, the end summary and the report's curves show one exponential moving average of it,
debiased (TensorBoard's and W&B's smoothing: the first steps are not pulled towards zero)."""

from __future__ import annotations

from collections.abc import Iterable

LOSS_SMOOTHING = 0.9  # the weight of the past; the console's "loss (EMA)" and the report's curves


class RunningEMA:
    """The debiased exponential moving average of the values given so far."""

    def __init__(self, weight: float = LOSS_SMOOTHING):
        self.weight, self.raw, self.count = weight, 0.0, 0

    def update(self, values: Iterable[float]) -> RunningEMA:
        for value in values:
            self.raw = self.weight * self.raw + (1 - self.weight) * float(value)
            self.count += 1
        return self

    @property
    def value(self) -> float | None:
        return self.raw / (1 - self.weight**self.count) if self.count else None
