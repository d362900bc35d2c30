"""Mixed placement: the fewest parameters kept digital that meet an accuracy budget.

:class:`Budget` — the largest loss allowed (``max_drop`` points below FP on a task,
``max_kl`` nats per token, or ``max_ppl_increase`` % perplexity) and units forced
digital or analog; read from YAML, unknown keys and layer names refused.

:func:`search_placement` — greedy by sensitivity per parameter, measured: start all
analog, keep the next unit of the ranking digital until the measured loss (mean over
the noise seeds, selection data) meets the budget; then try each unit kept digital,
latest first, analog again and keep it analog when the budget still holds.
:func:`verify_placement` — the written placement file through ``afm.convert`` on a
fresh copy of the FP model, calibrated, on held-out data and fresh noise seeds.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from afm.analog.convert import convert
from afm.analog.hf import read_quantization_config
from afm.analog.noise import NoiseModel
from afm.evaluate.report import mean_std
from afm.plan.bench import Bench, calibrate, scores_on_chip
from afm.plan.inputs import PlanInputError, read_yaml_mapping
from afm.plan.metrics import Metric
from afm.plan.units import Unit, resolve_units

__all__ = ["BUDGET_KEYS", "Budget", "PlacementSearch", "search_placement", "verify_placement"]

#: budget key -> the loss unit of the metric it bounds
BUDGET_KEYS = {"max_drop": "points", "max_kl": "nats/token", "max_ppl_increase": "% ppl"}


@dataclass(frozen=True)
class Budget:
    """At most ``max_loss`` worse than FP (``key`` says in which unit)."""

    key: str
    max_loss: float
    keep_digital: tuple[str, ...] = ()
    keep_analog: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.key not in BUDGET_KEYS:
            raise PlanInputError(f"budget key {self.key!r} is invalid: one of {list(BUDGET_KEYS)}")
        value = self.max_loss
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise PlanInputError(f"budget {self.key}={value!r} is invalid: must be a number")
        if value < 0:
            raise PlanInputError(
                f"budget {self.key}={value!r} is impossible: no placement is better than FP"
            )
        for name in ("keep_digital", "keep_analog"):
            names = getattr(self, name)
            if not all(isinstance(n, str) for n in names):
                raise PlanInputError(f"budget {name}={list(names)!r} must be a list of layer names")

    @property
    def unit(self) -> str:
        return BUDGET_KEYS[self.key]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "budget") -> Budget:
        allowed = set(BUDGET_KEYS) | {"keep_digital", "keep_analog"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanInputError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        keys = [k for k in BUDGET_KEYS if data.get(k) is not None]
        if len(keys) != 1:
            raise PlanInputError(f"{where}: give exactly one of {list(BUDGET_KEYS)}, got {keys}")
        lists = {}
        for name in ("keep_digital", "keep_analog"):
            value = data.get(name) or []
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise PlanInputError(f"{where}: {name} must be a list of layer names")
            lists[name] = tuple(value)
        return cls(keys[0], data[keys[0]], **lists)

    @classmethod
    def from_file(cls, path: str | Path) -> Budget:
        return cls.from_mapping(
            read_yaml_mapping(path, "budget file"), f"budget file {str(path)!r}"
        )

    def check(self, metric: Metric) -> None:
        if metric.unit != self.unit:
            fits = [k for k, u in BUDGET_KEYS.items() if u == metric.unit]
            raise PlanInputError(
                f"budget {self.key} bounds a loss in {self.unit}, but metric {metric.name} "
                f"measures {metric.unit}: use {', '.join(fits) or 'another metric'}"
            )


@dataclass
class PlacementSearch:
    """The result of :func:`search_placement` on the selection data."""

    digital: list[str]
    """Units kept digital."""
    analog_layers: list[str]
    losses: list[float]
    """Selection loss of the final placement, per noise seed."""
    steps: list[dict[str, Any]] = field(default_factory=list)


def _measure(
    bench: Bench, units: Sequence[Unit], digital: set[str], metric: Metric,
    noise: NoiseModel | None, seeds: Sequence[int], fp: float,
) -> list[float]:  # fmt: skip
    analog = [n for u in units if u.name not in digital for n in u.layers]
    return [metric.loss(s, fp) for s in bench.scores(analog, metric, noise, seeds)]


def search_placement(
    bench: Bench,
    units: Sequence[Unit],
    ranking: Sequence[str],
    metric: Metric,
    noise: NoiseModel | None,
    seeds: Sequence[int],
    budget: Budget,
    *,
    progress: bool = True,
) -> PlacementSearch:
    """Greedy by ``ranking`` (unit names, most valuable to keep digital first), measured,
    then pruned (module docstring).  Raises :class:`PlanInputError` for a budget no
    placement with an analog layer meets."""
    budget.check(metric)
    names = {u.name for u in units}
    missing = sorted(names - set(ranking))
    if missing:
        raise PlanInputError(f"the ranking has no entry for units {missing[:3]}")
    digital = resolve_units(budget.keep_digital, units, "keep_digital")
    forced = resolve_units(budget.keep_analog, units, "keep_analog")
    if digital & forced:
        raise PlanInputError(f"units both kept digital and analog: {sorted(digital & forced)}")
    fp = bench.scores((), metric, None, seeds[:1])[0]
    bar = tqdm(desc="placement search", unit="state", disable=not progress)
    steps: list[dict[str, Any]] = []

    def measure(dig: set[str], action: str, unit: str | None) -> list[float]:
        losses = _measure(bench, units, dig, metric, noise, seeds, fp)
        mean, std = mean_std(losses)
        step = {"action": action, "unit": unit, "digital": len(dig), "loss": mean, "std": std}
        steps.append({**step, "losses": losses})
        bar.update(1)
        bar.set_postfix_str(f"{len(dig)} digital, loss {mean:.3g} {metric.unit}")
        return losses

    def meets(losses: list[float]) -> bool:
        return mean_std(losses)[0] <= budget.max_loss

    if forced:
        best = measure(names - forced, "all digital but keep_analog", None)
        if not meets(best):
            raise PlanInputError(
                f"impossible budget: with every unit digital except keep_analog the loss is "
                f"{mean_std(best)[0]:.3g} {metric.unit} > {budget.key}={budget.max_loss}"
            )
    losses = measure(digital, "start", None)
    order = [n for n in ranking if n in names and n not in digital and n not in forced]
    added: list[str] = []
    while not meets(losses) and order:
        added.append(order.pop(0))
        digital.add(added[-1])
        losses = measure(digital, "keep digital", added[-1])
    if not meets(losses):  # defensive: all digital (FP) meets any budget >= 0
        raise PlanInputError(f"impossible budget: {budget.key}={budget.max_loss} is not met")
    for unit in reversed(added[:-1]):  # without the last one the budget was not met
        trial = measure(digital - {unit}, "analog again", unit)
        if meets(trial):
            digital, losses = digital - {unit}, trial
    bar.close()
    if digital >= names:
        raise PlanInputError(
            f"impossible budget: {budget.key}={budget.max_loss} is met only with every "
            "layer digital (nothing left for the chip)"
        )
    analog = [n for u in units if u.name not in digital for n in u.layers]
    return PlacementSearch([u.name for u in units if u.name in digital], analog, losses, steps)


def verify_placement(
    fp_model: nn.Module,
    tokenizer: Any,
    placement_file: str | Path,
    metric: Metric,
    noise: NoiseModel | None,
    seeds: Sequence[int],
    calibration: Sequence[str],
    budget: Budget,
    **calib: int,
) -> dict[str, Any]:
    """The placement file, read back and applied with ``afm.convert`` to a fresh copy of
    the FP model, calibrated, scored on ``metric`` (held-out data) over ``seeds``."""
    model = copy.deepcopy(fp_model).eval()
    convert(model, read_quantization_config(placement_file))
    calibrate(model, tokenizer, calibration, **calib)
    fp_score = metric.score(fp_model.eval())
    scores = scores_on_chip(model, metric, noise, seeds)
    losses = [metric.loss(s, fp_score) for s in scores]
    mean, std = mean_std(losses)
    return {
        "fp_score": fp_score,
        "scores": scores,
        "losses": losses,
        "loss_mean": mean,
        "loss_std": std,
        "seeds": list(seeds),
        "budget": {"key": budget.key, "max_loss": budget.max_loss},
        "passed": mean <= budget.max_loss,
    }
