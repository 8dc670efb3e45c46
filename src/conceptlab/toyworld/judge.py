"""The judge: a small CNN with one head per attribute of the world, trained on ground-truth labels.

It is a diffusers model (ModelMixin + ConfigMixin), so it saves and loads like any other part of
the pipeline (`Judge.from_pretrained(folder / "judge")`).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ConfigError
from ..evalcache import tensors_digest
from .world import ATTRIBUTES, RESOLUTION


class Judge(ModelMixin, ConfigMixin):
    """Reads each attribute of a world image; input [batch, 3, 32, 32] in [-1, 1]."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        attributes: dict[str, list[str]] | None = None,
        widths: tuple[int, ...] = (32, 64, 96, 128),
        resolution: int = RESOLUTION,
    ):
        super().__init__()
        if attributes is None:
            attributes = {name: list(values) for name, values in ATTRIBUTES.items()}
            self.register_to_config(attributes=attributes)
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
            ]
            if i < len(widths) - 1:
                layers.append(nn.AvgPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        # Mean pooling sees colours and backgrounds; max pooling sees small local evidence (stripes, edges).
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * channels, len(values)) for name, values in attributes.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        if images.shape[-2:] != (self.config.resolution, self.config.resolution):
            raise ConfigError(
                f"the judge reads {self.config.resolution}x{self.config.resolution} images of the toy world, "
                f"got {tuple(images.shape[-2:])}; sample at the world's resolution (data.resolution=null)"
            )
        h = self.features(images)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}

    @property
    def digest(self) -> str:
        """Identifies these weights (evaluation cache keys)."""

        if getattr(self, "_digest", None) is None:
            self._digest = tensors_digest(sorted(self.state_dict().items()))
        return self._digest

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The attribute values the judge sees in each image."""
        logits = self(images.to(self.device, self.dtype))
        names = self.config.attributes
        return {attr: [names[attr][i] for i in out.argmax(dim=1).tolist()] for attr, out in logits.items()}
