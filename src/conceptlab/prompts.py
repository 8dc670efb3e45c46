"""Prompt syntax: `<tag:name:multiplier>` for methods applied with a strength (AUTOMATIC1111's
`<hypernet:ink:0.7>`, `<lora:ink:0.8>`; the tags are the methods' `prompt_tag`s) and placeholder words
like `<my-cat>`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

PLACEHOLDER = re.compile(r"<[^<>\s:]+>")


@dataclass
class TagUse:
    tag: str  # the method's prompt tag: hypernet, lora, ...
    name: str
    multiplier: float


def tag_pattern(tags: Iterable[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)) or "(?!)"
    return re.compile(rf"<({alternatives}):([^:>]*)(?::([^>]*))?>")


def parse_prompt(prompt: str, tags: Iterable[str]) -> tuple[str, list[TagUse]]:
    """The prompt without its `<tag:name:m>` tags, and the tags in order (several stack)."""
    pattern = tag_pattern(tags)
    uses = []
    for match in pattern.finditer(prompt):
        tag, name, multiplier = match.group(1), match.group(2).strip(), match.group(3)
        if not name:
            raise ConfigError(f"{match.group(0)} names nothing; write <{tag}:name:0.7>")
        try:
            value = 1.0 if multiplier is None or not multiplier.strip() else float(multiplier)
        except ValueError:
            raise ConfigError(
                f"malformed multiplier {multiplier!r} in {match.group(0)}; use a number, e.g. <{tag}:{name}:0.7>"
            ) from None
        if not math.isfinite(value):
            raise ConfigError(f"multiplier {multiplier!r} in {match.group(0)} is not a finite number")
        uses.append(TagUse(tag, name, value))
    text = re.sub(r"\s+", " ", pattern.sub(" ", prompt))
    text = re.sub(r" ,", ",", text).strip(" ,")
    return text, uses


def placeholders(text: str) -> list[str]:
    """Angle-bracket words in a prompt (`<my-cat>`), which must name loaded embeddings."""
    return PLACEHOLDER.findall(text)
