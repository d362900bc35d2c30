"""The three ``afm-plan`` workflows end to end, one function each (the CLI calls them).

* :func:`run_sensitivity` — load the FP model, build the bench on the chip preset,
  measure every unit, write ``sensitivity.{json,md,png}``;
* :func:`run_placement` — the same sweep (or a saved one) for the ranking, the greedy
  search against the budget, the placement file, its held-out verification,
  ``place.{json,md}`` and ``placement.json`` (``placement-unverified.json`` when the
  held-out data miss the budget);
* :func:`run_cost` — one cost report per model on the chip, ``cost.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afm.analog.hf import AfmQuantizationConfig, read_quantization_config
from afm.analog.noise import NoiseModel, get_noise_model
from afm.evaluate.loading import load_model_spec
from afm.evaluate.specs import ModelSpec
from afm.plan.bench import Bench, calibration_texts
from afm.plan.chips import load_chip
from afm.plan.cost import CostReport, chip_cost
from afm.plan.inputs import PlanInputError
from afm.plan.metrics import make_metrics
from afm.plan.placement import Budget, search_placement, verify_placement
from afm.plan.report import (
    cost_markdown,
    cost_table,
    placement_markdown,
    plot_sensitivity,
    sensitivity_markdown,
)
from afm.plan.sensitivity import MODES, SensitivityResult, layer_sensitivity
from afm.plan.shapes import meta_model
from afm.plan.units import make_units
from afm.presets import PRESETS, analog_head_of, eval_noise_of, get_preset

__all__ = [
    "CostRequest",
    "PlaceRequest",
    "SweepRequest",
    "run_cost",
    "run_placement",
    "run_sensitivity",
]

logger = logging.getLogger(__name__)

#: what must agree between a saved sweep and a placement run that reuses its ranking
#: (the metric may differ: a smooth KL ranking can order a task placement)
_SAME_SWEEP = ("model", "preset", "head", "noise", "units")


@dataclass(frozen=True)
class SweepRequest:
    """A model on a chip preset, scored on a task or a text set (``afm-plan sensitivity``)."""

    model: str = "tiny"
    preset: str = "afm-paper"
    noise: str | None = None
    """Deployment noise (``afm.analog.noise`` name); None: the preset's; ``"none"``: off."""
    noise_scale: float | None = None
    head: str | None = None
    """The output head: ``"analog"`` (an analog-capable unit like any layer) or
    ``"digital"`` (always digital, noise-free); None: the preset's policy
    (``afm.presets.analog_head_of``), as ``afm-eval --model path=...,preset=...`` does."""
    task: str | None = None
    texts: str | None = None
    metric: str = "kl"
    units: str = "layers"
    seeds: int = 3
    limit: int | None = None
    """Documents per half (selection / held-out) at most."""
    calib: str = "toyworld"
    out: str = "runs/plan"
    threads: int | None = None
    progress: bool = True
    command: str = "afm-plan"


@dataclass(frozen=True)
class PlaceRequest(SweepRequest):
    """A sweep plus a budget (``afm-plan place``)."""

    budget_file: str | None = None
    max_drop: float | None = None
    max_kl: float | None = None
    max_ppl_increase: float | None = None
    keep_digital: tuple[str, ...] = ()
    keep_analog: tuple[str, ...] = ()
    sensitivity: str | None = None
    """A ``sensitivity.json`` to take the ranking from instead of measuring it."""
    verify_seeds: int | None = None
    """Noise seeds of the held-out check (None: as many as ``seeds``), after them."""


@dataclass(frozen=True)
class CostRequest:
    models: tuple[str, ...] = ("tiny",)
    chip: str = "hermes"
    chip_file: str | None = None
    placement: str | None = None
    digital: tuple[str, ...] = ()
    context: int | None = None
    """Cached tokens attended to (None: 1024, at most the model's positions)."""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] | None = None
    analog_head: bool = False
    out: str | None = None
    command: str = "afm-plan cost"


# ----------------------------------------------------------------------------- sweeps
def _noise(req: SweepRequest) -> NoiseModel | None:
    if req.noise == "none":
        return None
    spec: dict[str, Any] = eval_noise_of(req.preset)
    if req.noise is not None and req.noise != spec.get("name"):
        spec = {"name": req.noise}
    if req.noise_scale is not None:
        spec["scale"] = float(req.noise_scale)
    try:
        return get_noise_model(**spec)
    except (TypeError, ValueError) as err:
        raise PlanInputError(f"noise: {err}") from None


def _check(req: SweepRequest) -> None:
    if req.preset not in PRESETS:
        raise PlanInputError(f"unknown preset {req.preset!r}; available: {', '.join(PRESETS)}")
    if req.head not in (None, "analog", "digital"):
        raise PlanInputError(f"head={req.head!r} is invalid: choose 'analog' or 'digital'")
    if isinstance(req.seeds, bool) or not isinstance(req.seeds, int) or req.seeds < 1:
        raise PlanInputError(f"seeds={req.seeds!r} is invalid: must be a positive int")
    if req.limit is not None and req.limit < 1:
        raise PlanInputError(f"limit={req.limit!r} is invalid: must be a positive int")
    if req.threads is not None:
        torch.set_num_threads(req.threads)


@dataclass
class _Setup:
    model: Any
    tokenizer: Any
    bench: Bench
    units: list
    selection: Any
    held_out: Any
    noise: NoiseModel | None
    calibration: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _setup(req: SweepRequest) -> _Setup:
    _check(req)
    noise = _noise(req)
    model, tokenizer = load_model_spec(ModelSpec(req.model))
    calibration = calibration_texts(req.calib)
    analog_head = analog_head_of(req.preset) if req.head is None else req.head == "analog"
    bench = Bench(model, tokenizer, get_preset(req.preset), calibration, analog_head=analog_head)
    units = make_units(bench.layers, req.units)
    selection, held_out = make_metrics(
        tokenizer=tokenizer, fp_model=model, task=req.task, texts=req.texts,
        metric=req.metric, limit=req.limit,
    )  # fmt: skip
    data = f"task {req.task}" if req.task else f"text set {req.texts} ({req.metric})"
    meta = {
        "model": req.model,
        "preset": req.preset,
        "head": "analog" if analog_head else "digital",
        "noise": noise.to_dict() if noise is not None else None,
        "data": data + (f", {req.limit} documents per half" if req.limit else ""),
        "units": req.units,
        "calibration": req.calib,
        "command": req.command,
    }
    return _Setup(model, tokenizer, bench, units, selection, held_out, noise, calibration, meta)


def _write(out: Path, stem: str, data: dict[str, Any], markdown: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["md"].write_text(markdown)
    return paths


def _sweep(req: SweepRequest, s: _Setup, modes: tuple[str, ...]) -> SensitivityResult:
    return layer_sensitivity(
        s.bench, s.units, s.selection, s.noise, list(range(req.seeds)),
        modes=modes, meta=s.meta, progress=req.progress,
    )  # fmt: skip


def run_sensitivity(req: SweepRequest) -> tuple[SensitivityResult, dict[str, Path]]:
    """``afm-plan sensitivity``: both measurements for every unit (module docstring)."""
    setup = _setup(req)
    result = _sweep(req, setup, MODES)
    out = Path(req.out)
    paths = _write(out, "sensitivity", result.to_dict(), sensitivity_markdown(result))
    paths["png"] = plot_sensitivity(result, out / "sensitivity.png")
    return result, paths


# -------------------------------------------------------------------------- placement
def _budget(req: PlaceRequest) -> Budget:
    given = {k: getattr(req, k) for k in ("max_drop", "max_kl", "max_ppl_increase")}
    given = {k: v for k, v in given.items() if v is not None}
    if req.budget_file is not None:
        if given:
            raise PlanInputError("give the budget in a file (--budget) or as a flag, not both")
        budget = Budget.from_file(req.budget_file)
        extra = {"keep_digital": req.keep_digital, "keep_analog": req.keep_analog}
        return dataclasses.replace(
            budget, **{k: getattr(budget, k) + tuple(v) for k, v in extra.items()}
        )
    return Budget.from_mapping(
        {**given, "keep_digital": list(req.keep_digital), "keep_analog": list(req.keep_analog)}
    )


def _saved_ranking(path: str, meta: dict[str, Any]) -> SensitivityResult:
    try:
        saved = SensitivityResult.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PlanInputError(f"sensitivity file {path!r} is unreadable: {err}") from None
    for key in _SAME_SWEEP:
        if saved.meta.get(key) != meta.get(key):
            raise PlanInputError(
                f"sensitivity file {path!r} was measured with {key}={saved.meta.get(key)!r}, "
                f"this run has {key}={meta.get(key)!r}"
            )
    if "digital_alone" not in saved.modes:
        raise PlanInputError(f"sensitivity file {path!r} has no digital_alone measurements")
    return saved


def run_placement(req: PlaceRequest) -> tuple[dict[str, Any], dict[str, Path]]:
    """``afm-plan place``: the ranking, the search, the placement file and its held-out
    check; the placement file is ``placement.json`` only when the check passes."""
    budget = _budget(req)  # bad budgets fail before anything is loaded
    setup = _setup(req)
    budget.check(setup.selection)
    seeds = list(range(req.seeds))
    meta = {**setup.meta, "metric": setup.selection.name, "loss_unit": setup.selection.unit}
    if req.sensitivity:
        ranking = _saved_ranking(req.sensitivity, meta)
    else:
        ranking = _sweep(req, setup, ("digital_alone",))
    order = [u.name for u in ranking.ranked("digital_alone", per_param=True)]
    search = search_placement(
        setup.bench, setup.units, order, setup.selection, setup.noise, seeds, budget,
        progress=req.progress,
    )  # fmt: skip
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    draft = out / "placement-unverified.json"
    placement = AfmQuantizationConfig(setup.bench.chip, modules=search.analog_layers)
    draft.write_text(json.dumps(placement.to_dict(), indent=2) + "\n")
    n_verify = req.verify_seeds or req.seeds
    verification = verify_placement(
        setup.model, setup.tokenizer, draft, setup.held_out, setup.noise,
        list(range(req.seeds, req.seeds + n_verify)), setup.calibration, budget,
    )  # fmt: skip
    final = draft
    if verification["passed"]:
        final = draft.rename(out / "placement.json")
        read_quantization_config(final)  # the file as written reads back
    report = _placement_report(req, setup, meta, budget, ranking, search, verification, final)
    paths = _write(out, "place", report, placement_markdown(report))
    paths["placement"] = final
    return report, paths


def _placement_report(req, setup, meta, budget, ranking, search, verification, final):  # noqa: ANN001, ANN202
    params = {u.name: u.params for u in setup.units}
    digital = [(n, params[n]) for n in search.digital]
    return {
        "meta": {**meta, "seeds": list(range(req.seeds))},
        "budget": dataclasses.asdict(budget),
        "all_analog_loss": ranking.all_analog_loss,
        "ranking_from": req.sensitivity or "measured in this run",
        "ranking_metric": f"{ranking.meta.get('metric')} on {ranking.meta.get('data')}",
        "ranking": [u.name for u in ranking.ranked("digital_alone", per_param=True)],
        "n_units": len(setup.units),
        "params": sum(params.values()),
        "digital": search.digital,
        "digital_units": digital,
        "digital_params": sum(p for _, p in digital),
        "analog_layers": search.analog_layers,
        "selection_losses": search.losses,
        "steps": search.steps,
        "verification": verification,
        "placement_file": str(final),
    }


# ------------------------------------------------------------------------------- cost
def _context(req: CostRequest, model: Any) -> int:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if req.context is None:
        return min(1024, limit) if isinstance(limit, int) else 1024
    if isinstance(limit, int) and req.context > limit:
        raise PlanInputError(f"context={req.context} exceeds the model's {limit} positions")
    return req.context


def run_cost(req: CostRequest) -> tuple[list[CostReport], str, dict[str, Path]]:
    """``afm-plan cost``: every model of ``req.models`` on the chip, from configs alone;
    ``(reports, markdown, paths written)``."""
    if not req.models:
        raise PlanInputError("no model given")
    chip = load_chip(req.chip_file, req.chip)
    analog = read_quantization_config(req.placement).modules if req.placement else None
    if analog is not None and req.analog_head:
        raise PlanInputError("--analog-head and --placement: the placement says where the head is")
    reports = []
    for name in req.models:
        model, source = meta_model(name)
        reports.append(
            chip_cost(
                model,
                chip,
                name=name,
                config_source=source,
                analog=analog,
                digital=req.digital,
                context=_context(req, model),
                lora_rank=req.lora_rank,
                lora_targets=req.lora_targets,
                analog_head=req.analog_head,
            )  # fmt: skip
        )
    markdown = "\n".join(cost_markdown(r) for r in reports)
    if len(reports) > 1:
        markdown = "# Chip cost\n\n" + cost_table(reports) + "\n" + markdown
    paths: dict[str, Path] = {}
    if req.out:
        data = {"command": req.command, "reports": [r.to_dict() for r in reports]}
        paths = _write(Path(req.out), "cost", data, markdown)
    return reports, markdown, paths
