"""Durations for drift evaluation times: ``"1h"``, ``"10y"``, ``3600`` → seconds."""

from __future__ import annotations

import math
import re

__all__ = ["DRIFT_TIMES", "format_duration", "parse_duration"]

_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "mo": 30 * 86400.0,
    "y": 365 * 86400.0,
}
_DURATION_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)$")

#: The evaluation times of spec §5b (month = 30 days, year = 365 days).
DRIFT_TIMES: dict[str, float] = {
    "0s": 0.0,
    "1h": 3600.0,
    "1d": 86400.0,
    "1w": 604800.0,
    "1mo": 2592000.0,
    "1y": 31536000.0,
    "10y": 315360000.0,
}


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``"1h"``, ``"1d"``, ``"1w"``, ``"1mo"``, ``"1y"``, ``"10y"``, ``"90min"``,
    ``"3600"`` or ``"0s"`` (units s, min, h, d, w, mo = 30 d, y = 365 d); numbers pass
    through.  Raises ``ValueError`` naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '1h'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value.strip().lower())
        if m is None or m.group(2) not in _UNITS:
            hint = " ('m' is ambiguous: use 'min' or 'mo')" if m and m.group(2) == "m" else ""
            raise ValueError(
                f"invalid duration {value!r}{hint}: expected a non-negative number with an "
                f"optional unit s, min, h, d, w, mo, y (e.g. '1h', '10y', '3600')"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '1h'")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be finite and >= 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """Short label: the ``DRIFT_TIMES`` name when there is one, else e.g. ``'90s'``."""
    for name, value in DRIFT_TIMES.items():
        if value == seconds:
            return name
    return f"{seconds:g}s"
