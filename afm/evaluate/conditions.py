"""Chip conditions of an evaluation: deployment noise, drift times, config changes.

A :class:`Condition` is a deployment noise model (``afm.analog.noise``) applied once
per seed and restored afterwards, optionally with analog-config changes (bit widths)
applied to every analog layer for its duration.  :func:`make_conditions` builds FP /
noise / drift-time conditions; :mod:`afm.evaluate.sweep` builds sweep axes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from afm.analog.layers import analog_layers
from afm.analog.noise import NoiseModel, format_duration, get_noise_model, parse_duration
from afm.config import OutputQuantConfig, set_by_path
from afm.evaluate.specs import EvalInputError

__all__ = ["Condition", "analog_config_changes", "make_conditions", "seed_list"]


@dataclass(frozen=True)
class Condition:
    """A chip condition: a noise model applied once per seed (None: deterministic),
    plus analog-config changes ``{"input.bits": 6}`` applied to every analog layer."""

    label: str
    noise: NoiseModel | None = None
    seeds: tuple[int, ...] = (0,)
    x: float | None = None
    x_name: str | None = None
    config_changes: tuple[tuple[str, Any], ...] = ()
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise EvalInputError(f"condition {self.label!r} has no seeds")
        if self.noise is None and len(self.seeds) > 1:
            object.__setattr__(self, "seeds", self.seeds[:1])


def seed_list(seeds: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(seeds, int):
        if seeds <= 0:
            raise EvalInputError(f"number of seeds must be > 0, got {seeds}")
        return tuple(range(seeds))
    out = tuple(int(s) for s in seeds)
    if not out:
        raise EvalInputError("no seeds given")
    return out


def make_conditions(
    noise: str | None = None,
    seeds: int | Sequence[int] = 10,
    drift_times: Sequence[str | float] | None = None,
    noise_options: dict[str, Any] | None = None,
    include_fp: bool = True,
) -> list[Condition]:
    """``fp`` (no noise) and, with ``noise``, one condition per drift time (or one).

    ``drift_times`` (durations such as ``"0s"``, ``"1y"``) need a noise model with a
    ``t_inference`` field (``"pcm-drift"``).  The same seed at different times is the
    same programmed chip read at different times.
    """
    conds = [Condition("fp")] if include_fp else []
    if noise is None:
        if drift_times:
            raise EvalInputError("drift times need a noise model (e.g. --noise pcm-drift)")
        return conds
    seed_tuple = seed_list(seeds)
    opts = dict(noise_options or {})
    try:
        base = get_noise_model(noise, **opts)
    except (ValueError, TypeError) as err:
        raise EvalInputError(str(err)) from None
    if not drift_times:
        conds.append(Condition(base.label, base, seed_tuple, params={"noise": base.to_dict()}))
        return conds
    if not any(f.name == "t_inference" for f in dataclasses.fields(base)):  # type: ignore[arg-type]
        raise EvalInputError(
            f"drift times need a noise model with drift ('pcm-drift'), not {noise!r}"
        )
    for t in drift_times:
        try:
            seconds = parse_duration(t)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
        model = dataclasses.replace(base, t_inference=seconds)  # type: ignore[type-var]
        conds.append(
            Condition(
                f"{noise}@{format_duration(seconds)}",
                model,
                seed_tuple,
                x=seconds,
                x_name="drift_time",
                params={"noise": model.to_dict()},
            )
        )
    return conds


@contextlib.contextmanager
def analog_config_changes(model: nn.Module, changes: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Temporarily change every analog layer's config (``("input.bits", 6)``...)."""
    if not changes:
        yield
        return
    layers = analog_layers(model)
    if not layers:
        raise EvalInputError(
            f"config changes {list(changes)} need analog layers: evaluate an afm checkpoint "
            "or give the model a preset (preset=afm-paper)"
        )
    saved = {name: layer.analog_config for name, layer in layers.items()}
    try:
        for layer in layers.values():
            cfg = layer.analog_config
            for path, value in changes:
                try:
                    if path == "output.bits" and value is None:  # no ADC: no bound either
                        cfg = dataclasses.replace(cfg, output=OutputQuantConfig(None, None))
                        continue
                    cfg = set_by_path(cfg, path, value)
                except (ValueError, TypeError) as err:
                    raise EvalInputError(f"{path}={value!r}: {err}") from None
            layer.set_config(cfg)
        yield
    finally:
        for name, layer in layers.items():
            layer.set_config(saved[name])
