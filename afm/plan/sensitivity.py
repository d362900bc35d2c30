"""Layer sensitivity: what each layer (or block) costs on the chip, over noise seeds.

For every unit, two measurements against the FP model, each over the same noise seeds
(a layer's noise depends only on the seed and its name, so every state sees the same
programmed devices and differences are paired):

* ``analog_alone`` — only this unit analog, the rest digital: its own cost;
* ``digital_alone`` — everything analog except this unit: what keeping it digital
  recovers, ``loss(all analog) - loss(all analog but this unit)``.

Losses are in the metric's unit (points below FP, KL, % perplexity).  The ranking
for placement is the recovery per parameter: a layer kept digital costs its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from afm.analog.noise import NoiseModel
from afm.evaluate.report import mean_std
from afm.plan.bench import Bench
from afm.plan.metrics import Metric
from afm.plan.units import Unit

__all__ = ["MODES", "SensitivityResult", "UnitSensitivity", "layer_sensitivity"]

logger = logging.getLogger(__name__)

MODES = ("analog_alone", "digital_alone")


@dataclass
class UnitSensitivity:
    name: str
    layers: list[str]
    params: int
    analog_alone: list[float] = field(default_factory=list)
    """Loss with only this unit analog, per seed."""
    digital_alone: list[float] = field(default_factory=list)
    """Loss recovered by keeping only this unit digital, per seed."""

    def mean(self, mode: str) -> float:
        return mean_std(getattr(self, mode))[0]

    def std(self, mode: str) -> float:
        return mean_std(getattr(self, mode))[1]

    def per_param(self, mode: str = "digital_alone") -> float:
        """The mean of ``mode`` per million parameters of the unit."""
        return self.mean(mode) / (self.params / 1e6)


@dataclass
class SensitivityResult:
    """All measurements of a sweep, JSON-ready (``to_dict`` / ``from_dict``)."""

    meta: dict[str, Any]
    """model, preset, noise, metric, unit of the loss, units kind, seeds, documents."""
    fp_score: float
    all_analog_scores: list[float]
    all_analog_loss: list[float]
    units: list[UnitSensitivity]
    modes: list[str] = field(default_factory=lambda: list(MODES))

    def ranked(self, mode: str = "digital_alone", per_param: bool = False) -> list[UnitSensitivity]:
        """Units from the most to the least sensitive by ``mode`` (per parameter or not)."""
        if mode not in self.modes:
            raise ValueError(f"the sweep did not measure {mode!r} (it measured {self.modes})")

        def key(u: UnitSensitivity) -> float:
            return u.per_param(mode) if per_param else u.mean(mode)

        return sorted(self.units, key=key, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        units = [UnitSensitivity(**u) for u in data["units"]]
        return cls(**{**data, "units": units})


def layer_sensitivity(
    bench: Bench,
    units: Sequence[Unit],
    metric: Metric,
    noise: NoiseModel | None,
    seeds: Sequence[int],
    *,
    modes: Sequence[str] = MODES,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Measure every unit in every mode of ``modes`` (module docstring)."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={list(modes)!r} is invalid: choose from {MODES}")
    seeds = list(seeds)
    every = [n for u in units for n in u.layers]
    fp = bench.scores((), metric, None, seeds[:1])[0]
    total = (1 + len(units) * len(modes)) * len(seeds)
    bar = tqdm(total=total, desc="layer sensitivity", disable=not progress)

    def losses(analog: Sequence[str], label: str) -> list[float]:
        bar.set_postfix_str(label)
        out = [metric.loss(s, fp) for s in bench.scores(analog, metric, noise, seeds)]
        bar.update(len(seeds))
        return out

    all_scores = bench.scores(every, metric, noise, seeds)
    base = [metric.loss(s, fp) for s in all_scores]
    bar.update(len(seeds))
    results = []
    for unit in units:
        row = UnitSensitivity(unit.name, list(unit.layers), unit.params)
        if "analog_alone" in modes:
            row.analog_alone = losses(unit.layers, f"{unit.name} alone analog")
        if "digital_alone" in modes:
            rest = [n for n in every if n not in unit.layers]
            row.digital_alone = [
                b - x for b, x in zip(base, losses(rest, f"{unit.name} digital"), strict=True)
            ]
        results.append(row)
    bar.close()
    info = {**(meta or {}), "metric": metric.name, "loss_unit": metric.unit, "seeds": seeds}
    logger.info(
        "sensitivity: FP %s = %.4f, all analog loss %.3f", metric.name, fp, mean_std(base)[0]
    )
    return SensitivityResult(info, fp, all_scores, base, results, list(modes))
