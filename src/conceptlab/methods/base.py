"""The Method interface: everything the training loop, the data and the exports need from a method.

The LightningModule knows nothing method-specific: it asks the method for its parameters, lets it
install itself into the backbone, and hands it the run directory when the concept files are due.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..backbone import Backbone
from ..schedules import parse_lr_schedule


class Method(nn.Module, ABC):
    """A trainable add-on to a frozen backbone. Its own parameters are the only ones that train."""

    def __init__(self, name: str, lr: float | str, scale_lr: bool):
        super().__init__()
        self.name = name
        parse_lr_schedule(lr)  # a malformed schedule fails here, before anything loads
        self.lr = lr  # a rate, or an AUTOMATIC1111 schedule "1e-5:1000, 5e-6:3000, 1e-6"
        self.scale_lr = scale_lr

    @abstractmethod
    def attach(self, backbone: Backbone) -> None:
        """Install into the backbone (add tokens, wrap attention processors); raise on a misfit."""

    @property
    @abstractmethod
    def prompt_text(self) -> str:
        """What stands for the concept in a caption or prompt ({} / [name] in templates)."""

    @abstractmethod
    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        """Write the learned concept files into `folder` (atomically); return their paths."""

    @property
    def changes_text_encoding(self) -> bool:
        """Whether training changes what the text encoder outputs; if not, contexts are cached once."""
        return True

    @property
    def has_multiplier(self) -> bool:
        """Whether the method is applied with a strength at inference (hypernetworks: <hypernet:name:m>)."""
        return False

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        """Apply the method at this inference strength for the duration (a no-op without one)."""
        yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
