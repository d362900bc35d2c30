"""Robustness sweeps: accuracy vs a noise-model field or an analog-config field.

An axis is ``"<path>=<v1>,<v2>,..."``:

* ``noise.<field>`` — a field of the deployment noise model, e.g. ``noise.scale=0,1,2,4``
  (the PCM noise-scale multiplier) or ``noise.t_inference=0s,1d,1y``;
* an ``AnalogConfig`` path (``afm.config.set_by_path``), e.g. ``input.bits=4,6,8``,
  ``output.bits=4,6,8``, ``output.bound=8,14``, ``max_input_size=256,512``
  (changed on every analog layer for the duration of the condition);
* ``io.bits=4,6,8`` — input and output bits together.

Each value becomes one :class:`afm.evaluate.conditions.Condition` (evaluated over the
given noise seeds); :func:`afm.evaluate.loop.run_evaluation` then gives accuracy per
value, and :meth:`afm.evaluate.report.EvalReport.write` plots it (one panel per axis
and task, a line per model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from afm.analog.noise import NoiseModel, get_noise_model, parse_duration
from afm.evaluate.conditions import Condition, seed_list
from afm.evaluate.specs import EvalInputError

__all__ = ["parse_axis", "parse_value", "sweep_conditions"]


def parse_value(text: str) -> Any:
    """``"none"`` → None, ``"true"``/``"false"`` → bool, ints, floats, else the string."""
    s = text.strip()
    low = s.lower()
    if low in ("none", "null", "off"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``"noise.scale=0,1,2"`` → ``("noise.scale", [0, 1, 2])``."""
    path, sep, values = text.partition("=")
    path = path.strip()
    if not sep or not path or not values.strip():
        raise EvalInputError(f"sweep axis {text!r}: expected PATH=V1,V2,... (e.g. io.bits=4,6,8)")
    vals = [parse_value(v) for v in values.split(",") if v.strip()]
    if not vals:
        raise EvalInputError(f"sweep axis {text!r} has no values")
    return path, vals


def _noise_with(base: NoiseModel, field_name: str, value: Any) -> NoiseModel:
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    if field_name not in names:
        raise EvalInputError(
            f"noise model {base.name!r} has no field {field_name!r}; fields: {sorted(names)}"
        )
    if field_name == "t_inference":
        try:
            value = parse_duration(value)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
    try:
        return dataclasses.replace(base, **{field_name: value})  # type: ignore[type-var]
    except (ValueError, TypeError) as err:
        raise EvalInputError(f"noise.{field_name}={value!r}: {err}") from None


def _x(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return parse_duration(value)
    except ValueError:
        return None


def sweep_conditions(
    axes: Sequence[str | tuple[str, Sequence[Any]]],
    *,
    noise: str | None = None,
    noise_options: dict[str, Any] | None = None,
    seeds: int | Sequence[int] = 5,
) -> list[Condition]:
    """One condition per (axis, value).  Noise axes vary a field of ``noise`` (default
    ``"pcm"``); config axes apply ``noise`` too when it is given, else they are
    deterministic (one evaluation each)."""
    seed_tuple = seed_list(seeds)
    try:
        noise_base = get_noise_model(noise or "pcm", **dict(noise_options or {}))
    except (ValueError, TypeError) as err:
        raise EvalInputError(str(err)) from None
    base: NoiseModel | None = noise_base if noise is not None else None
    conds: list[Condition] = []
    for axis in axes:
        path, values = parse_axis(axis) if isinstance(axis, str) else (axis[0], list(axis[1]))
        for value in values:
            label = f"{path}={value}"
            if path.startswith("noise."):
                nm = _noise_with(noise_base, path.split(".", 1)[1], value)
                conds.append(
                    Condition(
                        label, nm, seed_tuple, _x(value), path, params={"noise": nm.to_dict()}
                    )
                )
                continue
            if path == "io.bits":
                changes: tuple[tuple[str, Any], ...] = (
                    ("input.bits", value),
                    ("output.bits", value),
                )
            else:
                changes = ((path, value),)
            params: dict[str, Any] = {"config_changes": [list(c) for c in changes]}
            if base is not None:
                params["noise"] = base.to_dict()
            conds.append(
                Condition(label, base, seed_tuple, _x(value), path, changes, params=params)
            )
    if not conds:
        raise EvalInputError("no sweep axes given")
    return conds
