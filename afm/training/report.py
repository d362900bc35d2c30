"""Before/after table of a distillation run on the model's bundled tasks.

Three conditions, each on the same test problems:

* ``teacher_fp``      — the digital teacher;
* ``teacher_analog``  — the teacher converted to the evaluation chip (input ranges
  calibrated on a few synthetic batches), with deployment weight noise;
* ``student_analog``  — the distilled student on the same chip, same noise.

Noise is applied with ``afm.analog.noise.apply_noise_`` for ``seeds`` seeds (the same
seeds for both models); results are mean ± std over seeds.  Only the bundled
``tiny`` teacher has bundled tasks today (toy-world arithmetic and facts).
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.calibration import calibrate_input_ranges_
from afm.analog.convert import convert
from afm.analog.layers import analog_layers
from afm.analog.noise import NoiseModel, get_noise_model
from afm.config import AnalogConfig
from afm.evaluate.loop import scores_under_noise
from afm.models import resolve_model
from afm.presets import get_preset
from afm.toyworld.scoring import evaluate_arith, evaluate_facts
from afm.toyworld.world import ToyWorldConfig, arith_problems, fact_questions

logger = logging.getLogger(__name__)

__all__ = ["has_bundled_tasks", "ToyTasks", "before_after", "format_table"]


def has_bundled_tasks(model_name: str) -> bool:
    """True for the bundled toy-world teacher (alias ``tiny`` or its directory)."""
    resolved = Path(resolve_model(model_name)).resolve()
    tiny = Path(resolve_model("tiny")).resolve()
    return resolved == tiny


class ToyTasks:
    """Toy-world test problems: arithmetic per (digits, op) and closed-book facts."""

    def __init__(self, n_per_kind: int = 25, facts: bool = True, seed: int = 0) -> None:
        self.arith = []
        for d in ToyWorldConfig().digits:  # the operand sizes the teacher was taught
            for op in ("+", "-"):
                self.arith += arith_problems("test", n_per_kind, seed=seed, digits=(d,), ops=(op,))
        self.facts = fact_questions("test") if facts else []

    def __call__(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        out = {"arith": evaluate_arith(model, tokenizer, self.arith, batch_size=75)}
        if self.facts:
            out["facts"] = evaluate_facts(model, tokenizer, self.facts, batch_size=96)
        return out


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def _under_noise(
    model: nn.Module, tokenizer: Any, tasks: ToyTasks, noise: NoiseModel, seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    runs = scores_under_noise(model, lambda m: tasks(m, tokenizer), noise, seeds)
    return {k: _stats([run[k] for run in runs]) for k in runs[0]}


def _chip(preset: str | AnalogConfig) -> AnalogConfig:
    return get_preset(preset) if isinstance(preset, str) else preset


def analog_teacher(
    teacher: nn.Module,
    preset: str | AnalogConfig,
    calibration: Sequence[dict[str, torch.Tensor]],
    analog_head: bool = False,
) -> nn.Module:
    """A copy of the teacher on the chip ``preset``, input ranges calibrated (no training);
    with ``analog_head`` its output head is analog (and noisy) too."""
    model = copy.deepcopy(teacher)
    convert(model, _chip(preset), convert_lm_head=analog_head)
    calibrate_input_ranges_(model, calibration, max_steps=len(calibration), progress=False)
    return model.eval()


def on_chip(student: nn.Module, preset: str | AnalogConfig) -> nn.Module:
    """The student with its layers switched to ``preset`` (learned ranges kept)."""
    cfg = _chip(preset)
    model = copy.deepcopy(student)
    for layer in analog_layers(model).values():
        if layer.analog_config != cfg:
            layer.set_config(cfg)
    return model.eval()


def before_after(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer: Any,
    calibration: Sequence[dict[str, torch.Tensor]],
    *,
    preset: str | AnalogConfig,
    chip_name: str | None = None,
    noise: str | dict[str, Any] = "pcm",
    noise_scale: float | None = None,
    seeds: int = 3,
    n_per_kind: int = 25,
    facts: bool = True,
    curve_scales: Sequence[float] = (),
    analog_head: bool = False,
) -> dict[str, Any]:
    """Accuracies of the three conditions (module docstring); ``curve`` adds noise scales.
    ``analog_head``: the analog teacher's head is analog too (the student's is as trained);
    deployment noise reaches a head exactly when it is analog."""
    tasks = ToyTasks(n_per_kind, facts)
    seed_list = list(range(seeds))
    t_fp = {k: _stats([v]) for k, v in tasks(teacher.eval(), tokenizer).items()}
    t_an = analog_teacher(teacher, preset, calibration, analog_head)
    s_an = on_chip(student, preset)
    spec = dict(noise) if isinstance(noise, dict) else {"name": noise}
    if noise_scale is not None:
        spec["scale"] = float(noise_scale)
    name = spec.pop("name")
    model = get_noise_model(name, **spec)
    result: dict[str, Any] = {
        "chip": chip_name or (preset if isinstance(preset, str) else "custom"),
        "head": "analog" if analog_head else "digital",
        "noise": model.to_dict(),
        "seeds": seed_list,
        "n_arith": len(tasks.arith),
        "n_facts": len(tasks.facts),
        "teacher_fp": t_fp,
        "teacher_analog": _under_noise(t_an, tokenizer, tasks, model, seed_list),
        "student_analog": _under_noise(s_an, tokenizer, tasks, model, seed_list),
    }
    if curve_scales:
        curve = []
        for scale in curve_scales:
            m = get_noise_model(name, **{**spec, "scale": float(scale)})
            curve.append(
                {
                    "scale": float(scale),
                    "teacher_analog": _under_noise(t_an, tokenizer, tasks, m, seed_list),
                    "student_analog": _under_noise(s_an, tokenizer, tasks, m, seed_list),
                }
            )
        result["curve"] = curve
    return result


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if len(entry["values"]) == 1:
        return f"{100 * entry['mean']:.1f}"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table (accuracy in %, mean ± std over noise seeds)."""
    tasks = list(result["teacher_fp"])
    rows = [
        ("teacher FP (digital)", result["teacher_fp"]),
        ("teacher, analog + noise", result["teacher_analog"]),
        ("student, analog + noise", result["student_analog"]),
    ]
    head = ["condition", *[f"{t} (%)" for t in tasks]]
    body = [[name, *[_cell(r.get(t)) for t in tasks]] for name, r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    noise = result["noise"]
    lines = [
        f"chip {result['chip']}, head {result.get('head', 'digital')}, "
        f"noise {noise.get('name')} scale {noise.get('scale')}, "
        f"{len(result['seeds'])} noise seeds, {result['n_arith']} arithmetic problems, "
        f"{result['n_facts']} fact questions",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    for point in result.get("curve", []):
        cells = [
            f"{t}: teacher {_cell(point['teacher_analog'].get(t))} / student "
            f"{_cell(point['student_analog'].get(t))}"
            for t in tasks
        ]
        lines.append(f"noise scale {point['scale']:g}: " + "; ".join(cells))
    return "\n".join(lines)
