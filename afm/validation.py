"""Field validators shared by every afm config (hardware, noise, data, training, runs).

Each raises ``ValueError("<owner>.<field>=<value> is invalid: <why>")`` so an error
always names the field and the value.  ``owner`` is the dataclass name
(``"InputQuantConfig"``) or the user-facing section (``"train"``, ``"data"``).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

__all__ = [
    "fail",
    "check_bits",
    "check_bool",
    "check_choice",
    "check_int",
    "check_real",
    "coerce_enum",
]


def fail(owner: str, name: str, value: Any, why: str) -> None:
    """Raise the one error message format of afm's validators."""
    raise ValueError(f"{owner}.{name}={value!r} is invalid: {why}")


def check_bits(owner: str, name: str, bits: Any) -> None:
    """An int in [2, 16] or None (quantization off)."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int):
        fail(owner, name, bits, "must be an int or None")
    if not 2 <= bits <= 16:
        fail(owner, name, bits, "must be between 2 and 16 (None switches quantization off)")


def check_real(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    maximum: float | None = None,
) -> None:
    """A finite number >= ``minimum`` (> with ``strict``) and <= ``maximum``; no bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(owner, name, value, "must be a number")
    if not math.isfinite(value):
        fail(owner, name, value, "must be finite")
    if strict and value <= minimum:
        fail(owner, name, value, f"must be > {minimum}")
    if not strict and value < minimum:
        fail(owner, name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        fail(owner, name, value, f"must be <= {maximum}")


def check_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False
) -> None:
    """An int (not a bool) >= ``minimum``; None only with ``allow_none``."""
    if value is None and allow_none:
        return
    suffix = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(owner, name, value, f"must be an int{suffix}")
    if minimum is not None and value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        fail(owner, name, value, f"must be {what}{suffix}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(owner, name, value, "must be a bool")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        fail(owner, name, value, f"must be one of {choices}")


def coerce_enum(owner: str, name: str, enum_cls: type[Enum], value: Any) -> Enum:
    """``value`` as a member of ``enum_cls`` (members and their values accepted)."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        fail(owner, name, value, f"must be one of {allowed}")
    raise AssertionError  # unreachable
