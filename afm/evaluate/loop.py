"""The evaluation loop, written once: model × chip condition × noise seed.

* :func:`programmed` — yields each seed with the model programmed by a deployment
  noise model (restored bitwise after each seed, also on errors);
* :func:`scores_under_noise` — ``fn(model)`` once per seed (training report, LoRA);
* :func:`chip_runs` — every model × condition × seed, models loaded one at a time
  (``afm-eval``, test-time compute);
* :func:`run_evaluation` — ``chip_runs`` through a :class:`Runner` into a report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from afm.analog.noise import NoiseModel, apply_noise_, seeded_read_noise
from afm.evaluate.conditions import Condition, analog_config_changes
from afm.evaluate.loading import load_model_spec
from afm.evaluate.report import EvalReport, ResultRow
from afm.evaluate.specs import EvalInputError, ModelSpec

__all__ = [
    "ChipRun",
    "Runner",
    "chip_runs",
    "programmed",
    "run_evaluation",
    "scores_under_noise",
]

T = TypeVar("T")
ModelItem = ModelSpec | tuple[str, nn.Module, Any]


def programmed(
    model: nn.Module, noise_model: NoiseModel | None, seeds: Sequence[int], **select: Any
) -> Iterator[int]:
    """Yield every seed of ``seeds`` with ``model`` programmed by ``noise_model`` with that
    seed; the original weights are back after each step of the iteration.

    ``noise_model=None``: the model as it is, once (the first seed; eval-time output
    noise, where the chip keeps it, is seeded from it as on a programmed chip).
    ``select`` goes to ``apply_noise_`` (e.g. ``only_analog=True``)."""
    if noise_model is None:
        with seeded_read_noise(model, int(seeds[0])):
            yield seeds[0]
        return
    for seed in seeds:
        handle = apply_noise_(model, noise_model, int(seed), **select)
        try:
            yield seed
        finally:
            handle.restore()


def scores_under_noise(
    model: nn.Module,
    fn: Callable[[nn.Module], T],
    noise_model: NoiseModel | None,
    seeds: Sequence[int],
    **select: Any,
) -> list[T]:
    """``fn(model)`` once per deployment-noise seed (one programmed chip each)."""
    return [fn(model) for _ in programmed(model, noise_model, seeds, **select)]


@dataclass
class ChipRun:
    """One evaluation: this model, programmed for this condition and seed, right now."""

    label: str
    model: nn.Module
    tokenizer: Any
    condition: Condition
    seed: int


def chip_runs(
    models: Sequence[ModelItem],
    conditions: Sequence[Condition],
    *,
    device: str | torch.device = "cpu",
    on_model: Callable[[str], None] | None = None,
) -> Iterator[ChipRun]:
    """Every model × condition × seed; the model is on the chip only while it is yielded.

    ``models`` are :class:`ModelSpec` (loaded one at a time, dropped after) or
    ``(label, model, tokenizer)`` triples already in memory; ``on_model(label)`` is
    called before each model's first run."""
    for item in models:
        if isinstance(item, ModelSpec):
            label = item.name
            model, tokenizer = load_model_spec(item, device)
        else:
            label, model, tokenizer = item
        if on_model is not None:
            on_model(label)
        for cond in conditions:
            with analog_config_changes(model, cond.config_changes):
                for seed in programmed(model, cond.noise, cond.seeds):
                    yield ChipRun(label, model, tokenizer, cond, seed)
        del model


class Runner(Protocol):
    """Scores a model as it is now (``afm.evaluate.runners``: lm-eval and toy-world)."""

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, tuple[str, float]]:
        """``{task: (metric, score)}`` for the model as it is now."""
        ...

    def reset_model(self) -> None:
        """Forget any per-model state (called when a new model starts)."""
        ...


def run_evaluation(
    models: Sequence[ModelItem],
    runner: Runner,
    conditions: Sequence[Condition],
    *,
    device: str | torch.device = "cpu",
    title: str = "afm-eval",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Every model × condition × seed through ``runner``; noise restored after each seed."""
    if not models:
        raise EvalInputError("no models given")
    if not conditions:
        raise EvalInputError("no conditions given")
    rows: dict[tuple[str, str, str], ResultRow] = {}
    total = sum(len(c.seeds) for c in conditions) * len(models)
    bar = tqdm(total=total, desc="conditions × seeds", disable=not progress)

    def new_model(label: str) -> None:
        runner.reset_model()
        bar.set_postfix_str(f"loaded {label}")

    runs = contextlib.closing(chip_runs(models, conditions, device=device, on_model=new_model))
    with runs as each:  # closing: the last model is off the chip even when a run raises
        for run in each:
            bar.set_postfix_str(f"{run.label} | {run.condition.label} | seed {run.seed}")
            _record(rows, run, runner.run(run.model, run.tokenizer))
            bar.update(1)
    bar.close()
    return EvalReport(list(rows.values()), dict(meta or {}), title)


def _record(
    rows: dict[tuple[str, str, str], ResultRow],
    run: ChipRun,
    scores: dict[str, tuple[str, float]],
) -> None:
    cond = run.condition
    for task, (metric, score) in scores.items():
        key = (run.label, cond.label, task)
        if key not in rows:
            rows[key] = ResultRow(
                run.label, task, metric, cond.label, [], [], cond.x, cond.x_name, dict(cond.params)
            )
        rows[key].scores.append(score)
        rows[key].seeds.append(run.seed if cond.noise else None)
