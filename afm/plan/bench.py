"""A model on the chip layer by layer: switch any set of layers analog, score it.

:class:`Bench` converts a copy of the model once (``afm.convert``: every linear layer,
the output head too when ``analog_head``, the preset's head policy) and keeps each
layer twice, as its ``AnalogLinear`` and as the ``nn.Linear`` sharing the same weight.
:meth:`Bench.set_state` puts the analog version of the chosen layers in place, the
digital one elsewhere, and calibrates the input ranges for that state (as ``afm-eval``
does after converting with a placement), so a state is exactly
``afm.convert(model, placement)`` + calibration.  Scores under deployment noise go
through ``afm.evaluate.loop.programmed`` on the analog layers only.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from afm.analog.calibration import calibrate_on_texts
from afm.analog.convert import convert
from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.noise import NoiseModel, seeded_read_noise
from afm.analog.select import set_module
from afm.config import AnalogConfig
from afm.evaluate.loading import read_texts
from afm.evaluate.loop import programmed
from afm.plan.metrics import Metric
from afm.toyworld.world import training_documents

__all__ = ["CALIBRATION", "Bench", "calibrate", "calibration_texts", "scores_on_chip"]

#: input-range calibration as ``afm-eval`` does it after an on-the-fly conversion
#: (``afm.evaluate.loading``: 16 batches of 8 documents, right padding, <= 512 tokens)
CALIBRATION = {"batch_size": 8, "steps": 16, "max_length": 512}


def calibration_texts(source: str = "toyworld", steps: int = CALIBRATION["steps"]) -> list[str]:
    """The calibration documents: ``toyworld`` training documents or a text file."""
    n = steps * CALIBRATION["batch_size"]
    if source == "toyworld":
        docs = training_documents()
        return [next(docs) for _ in range(n)]
    return read_texts(source, n, "calibration file")


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = CALIBRATION["batch_size"],
    max_length: int = CALIBRATION["max_length"],
) -> int:
    """Input ranges of every analog layer of ``model`` from ``texts`` (all of them)."""
    limit = getattr(tokenizer, "model_max_length", max_length) or max_length
    return calibrate_on_texts(
        model,
        tokenizer,
        texts,
        batch_size=batch_size,
        max_steps=-(-len(texts) // batch_size),
        max_length=min(max_length, limit),
        padding_side="right",
    )


class Bench:
    """A converted, switchable copy of ``model`` (the original is not changed)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        chip: AnalogConfig,
        calibration: Sequence[str],
        *,
        calib_batch_size: int = CALIBRATION["batch_size"],
        max_length: int = CALIBRATION["max_length"],
        analog_head: bool = False,
    ) -> None:
        if not calibration:
            raise ValueError("the bench needs calibration texts for the input ranges")
        self.model = convert(copy.deepcopy(model).eval(), chip, convert_lm_head=analog_head)
        self.tokenizer = tokenizer
        self.chip = chip
        self.calibration = list(calibration)
        self.calib_batch_size = calib_batch_size
        self.max_length = max_length
        self.analog: dict[str, AnalogLinear] = analog_layers(self.model)
        self.digital: dict[str, nn.Module] = {n: m.to_linear() for n, m in self.analog.items()}
        self.state: frozenset[str] = frozenset(self.analog)
        self.set_state(())

    @property
    def layers(self) -> dict[str, AnalogLinear]:
        """The analog-capable layers, ``{name: AnalogLinear}`` in model order."""
        return dict(self.analog)

    def set_state(self, analog: Collection[str]) -> None:
        """Exactly the layers ``analog`` analog (input ranges calibrated), the rest digital."""
        wanted = frozenset(analog)
        unknown = sorted(wanted - set(self.analog))
        if unknown:
            raise ValueError(f"not analog-capable layers of the bench: {unknown[:3]}")
        for name in self.analog:
            if (name in wanted) != (name in self.state):
                set_module(
                    self.model, name, self.analog[name] if name in wanted else self.digital[name]
                )
        self.state = wanted
        if wanted and any(self.analog[n].analog_config.input.uses_range for n in wanted):
            calibrate(
                self.model,
                self.tokenizer,
                self.calibration,
                batch_size=self.calib_batch_size,
                max_length=self.max_length,
            )
        self.model.eval()

    def scores(
        self,
        analog: Collection[str],
        metric: Metric,
        noise: NoiseModel | None,
        seeds: Sequence[int],
    ) -> list[float]:
        """``metric.score`` with ``analog`` analog, once per noise seed (one programmed
        chip each, :func:`scores_on_chip`); the all-digital state is the FP model,
        scored once and repeated."""
        self.set_state(analog)
        if not self.state:
            return [metric.score(self.model)] * len(seeds)
        return scores_on_chip(self.model, metric, noise, seeds)


def scores_on_chip(
    model: nn.Module, metric: Metric, noise: NoiseModel | None, seeds: Sequence[int]
) -> list[float]:
    """``metric.score`` once per seed: the analog layers programmed with that seed, or,
    without programming noise, their eval-time output noise seeded from it (a chip
    that keeps output noise at eval, ``ahwa-lora``, is not deterministic otherwise)."""
    if noise is not None:
        return [
            metric.score(model) for _ in programmed(model, noise, list(seeds), only_analog=True)
        ]
    scores = []
    for seed in seeds:
        with seeded_read_noise(model, int(seed)):
            scores.append(metric.score(model))
    return scores
