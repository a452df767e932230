"""Durations as operators write them: ``500ms``, ``1.5s``, ``2s``, ``1m``, ``1h``, ``30d``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Return seconds; ValueError naming the text when it is not a duration."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (write e.g. 500ms, 1.5s, 2s, 1m)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 0.5 -> '500ms', 2.0 -> '2s', 90.0 -> '90s'."""
    millis = round(seconds * 1000)
    if millis % 1000:
        return f"{millis}ms"
    if millis % 3_600_000 == 0 and millis:
        return f"{millis // 3_600_000}h"
    if millis % 60_000 == 0 and millis:
        return f"{millis // 60_000}m"
    return f"{millis // 1000}s"


def duration_within(seconds: float, low: float, high: float, what: str = "") -> float:
    """``seconds`` when ``low <= seconds <= high``; otherwise ValueError, one line:
    "[what ]48h is outside 1s..24h"."""
    if not low <= seconds <= high:
        named = f"{what} " if what else ""
        raise ValueError(
            f"{named}{format_duration(seconds)} is outside "
            f"{format_duration(low)}..{format_duration(high)}"
        )
    return seconds
