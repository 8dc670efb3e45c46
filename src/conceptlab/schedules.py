"""Learning-rate schedules in AUTOMATIC1111's syntax: "1e-5:1000, 5e-6:3000, 1e-6".

Each entry is `rate:last_step` (the rate holds until that step) and the last may omit the step
(it holds to the end). A plain number is a constant rate.
"""

from __future__ import annotations

import math

from .errors import ConfigError


def parse_lr_schedule(spec: float | int | str) -> list[tuple[float, int | None]]:
    """[(rate, until_step), ...]; until_step None = to the end."""
    shown = f"method.lr={spec}"  # as the user wrote it
    if isinstance(spec, bool):
        raise ConfigError(f"{shown} is not a number")
    if isinstance(spec, int | float):
        spec = repr(float(spec))
    entries: list[tuple[float, int | None]] = []
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    for i, part in enumerate(parts):
        rate, _, until = part.partition(":")
        try:
            entry = (float(rate), int(until) if until.strip() else None)
        except ValueError:
            raise ConfigError(
                f"{shown}: {part!r} is not 'rate' or 'rate:step' (e.g. \"1e-5:1000, 5e-6:3000, 1e-6\")"
            ) from None
        if entry[1] is None and i != len(parts) - 1:
            raise ConfigError(f"{shown}: only the last entry may leave out its step")
        if entries and entry[1] is not None and entries[-1][1] is not None and entry[1] <= entries[-1][1]:
            raise ConfigError(f"{shown}: the steps must increase")
        if not (math.isfinite(entry[0]) and entry[0] > 0):
            raise ConfigError(f"{shown}: rates must be positive finite numbers")
        entries.append(entry)
    if not entries:
        raise ConfigError(f"{shown} is empty")
    return entries


def rate_at(schedule: list[tuple[float, int | None]], step: int) -> float:
    """The rate in effect at optimizer step `step` (0-based); the last rate holds past the last step."""
    for rate, until in schedule:
        if until is None or step < until:
            return rate
    return schedule[-1][0]


def scaled(schedule: list[tuple[float, int | None]], factor: float) -> list[tuple[float, int | None]]:
    return [(rate * factor, until) for rate, until in schedule]
