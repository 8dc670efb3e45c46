"""Prompt syntax: `<tag:name:multiplier>` for methods applied with a strength (AUTOMATIC1111's
`<hypernet:ink:0.7>`, `<lora:ink:0.8>`; the tags are the methods' `prompt_tag`s), placeholder words
like `<my-cat>`, and AUTOMATIC1111's weighted spans `(<my-cat>:1.3)` / `(a red hat:0.8)`."""

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


WEIGHTED = re.compile(r"\(([^()]+):\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*\)")


def weighted_spans(text: str) -> list[tuple[str, float]]:
    """The prompt cut into (text, weight) spans: `(words:w)` weighs its words by w (AUTOMATIC1111's
    emphasis), everything else 1. Parentheses without `:number` are ordinary text."""
    spans, pos = [], 0
    for match in WEIGHTED.finditer(text):
        if match.start() > pos:
            spans.append((text[pos : match.start()], 1.0))
        weight = float(match.group(2))
        if not math.isfinite(weight):
            raise ConfigError(f"weight {match.group(2)!r} in {match.group(0)} is not a finite number")
        spans.append((match.group(1), weight))
        pos = match.end()
    if pos < len(text):
        spans.append((text[pos:], 1.0))
    return spans


def has_weights(text: str) -> bool:
    return WEIGHTED.search(text) is not None


def fill_prompt(template: str, concept: str) -> str:
    """A template or prompt with the concept where it says `{}` (or `[name]`, AUTOMATIC1111's word)."""
    return template.replace("{}", concept).replace("[name]", concept)
