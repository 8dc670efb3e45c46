"""Prompt syntax: AUTOMATIC1111's `<hypernet:name:multiplier>` and placeholder words like `<my-cat>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

HYPERNET_TAG = re.compile(r"<hypernet:([^:>]*)(?::([^>]*))?>")
PLACEHOLDER = re.compile(r"<[^<>\s:]+>")


@dataclass
class HypernetUse:
    name: str
    multiplier: float


def parse_prompt(prompt: str) -> tuple[str, list[HypernetUse]]:
    """The prompt without its `<hypernet:...>` tags, and the tags in order (several stack)."""
    uses = []
    for match in HYPERNET_TAG.finditer(prompt):
        name, multiplier = match.group(1).strip(), match.group(2)
        if not name:
            raise ConfigError(f"{match.group(0)} names no hypernetwork; write <hypernet:name:0.7>")
        try:
            value = 1.0 if multiplier is None or not multiplier.strip() else float(multiplier)
        except ValueError:
            raise ConfigError(
                f"malformed multiplier {multiplier!r} in {match.group(0)}; use a number, e.g. <hypernet:{name}:0.7>"
            ) from None
        uses.append(HypernetUse(name, value))
    text = re.sub(r"\s+", " ", HYPERNET_TAG.sub(" ", prompt))
    text = re.sub(r" ,", ",", text).strip(" ,")
    return text, uses


def placeholders(text: str) -> list[str]:
    """Angle-bracket words in a prompt (`<my-cat>`), which must name loaded embeddings."""
    return PLACEHOLDER.findall(text)
