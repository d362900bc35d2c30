"""Markdown tables and plots of afm-plan's results (the JSON files keep every number).

* :func:`sensitivity_markdown` / :func:`plot_sensitivity` — the ranked table and a bar
  chart (mean ± std over noise seeds) of both measurements per unit;
* :func:`placement_markdown` — the budget, the search, the held-out verification;
* :func:`cost_markdown` / :func:`cost_table` — one model's cost, several side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afm.evaluate.report import mean_std, pyplot
from afm.plan.cost import CostReport
from afm.plan.sensitivity import SensitivityResult

__all__ = [
    "cost_markdown",
    "cost_table",
    "placement_markdown",
    "plot_sensitivity",
    "sensitivity_markdown",
]


def _pm(values: Sequence[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _digits(unit: str) -> int:
    return 4 if unit == "nats/token" else 2


def _score(value: float, unit: str) -> str:
    return f"{100 * value:.1f} %" if unit == "points" else f"{value:.4g}"


def _header(meta: dict[str, Any]) -> list[str]:
    noise = meta.get("noise") or {}
    noise_text = (
        "no deployment noise"
        if not noise
        else (f"deployment noise {noise.get('name')} scale {noise.get('scale', 1)}")
    )
    return [
        f"model `{meta.get('model')}`, chip preset `{meta.get('preset')}` (output head "
        f"{meta.get('head', '?')}), {noise_text}",
        f"metric `{meta.get('metric')}` on {meta.get('data', '?')}; loss = {meta.get('loss_unit')} "
        f"worse than FP; noise seeds {meta.get('seeds')}",
    ]


def sensitivity_markdown(result: SensitivityResult) -> str:
    """The ranked table (by recovery per parameter when measured, else by own cost)."""
    meta, unit = result.meta, result.meta.get("loss_unit", "")
    d = _digits(unit)
    lines = [f"# Layer sensitivity: {meta.get('model')} on {meta.get('preset')}", ""]
    lines += [f"- {line}" for line in _header(meta)]
    lines += [
        f"- FP score {_score(result.fp_score, unit)}; every unit analog: loss "
        f"{_pm(result.all_analog_loss, d)} {unit}",
        "- *analog alone*: loss with only this unit analog; *kept digital*: loss recovered "
        "by keeping only this unit digital (all others analog); per M params: the latter "
        "per million parameters of the unit (the placement's greedy order)",
        "",
        "| rank | unit | params | analog alone | kept digital | kept digital per M params |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    digital = "digital_alone" in result.modes
    order = result.ranked("digital_alone" if digital else "analog_alone", per_param=digital)
    for i, u in enumerate(order, 1):
        alone = _pm(u.analog_alone, d) if u.analog_alone else "-"
        kept = _pm(u.digital_alone, d) if u.digital_alone else "-"
        per = f"{u.per_param():.{d}f}" if u.digital_alone else "-"
        lines.append(f"| {i} | `{u.name}` | {u.params:,} | {alone} | {kept} | {per} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(result: SensitivityResult, path: str | Path) -> Path:
    """Horizontal bars per unit and mode, error bars ±std over seeds."""
    plt = pyplot()
    units = list(
        reversed(
            result.ranked("digital_alone" if "digital_alone" in result.modes else "analog_alone")
        )
    )
    height = max(2.5, 0.28 * len(units) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    width = 0.4
    ys = list(range(len(units)))
    labels = {"analog_alone": "analog alone (own cost)", "digital_alone": "kept digital (recovers)"}
    for k, mode in enumerate(m for m in ("analog_alone", "digital_alone") if m in result.modes):
        ax.barh(
            [y + (k - 0.5) * width for y in ys],
            [u.mean(mode) for u in units],
            xerr=[u.std(mode) for u in units],
            height=width,
            capsize=2,
            label=labels[mode],
        )
    ax.set_yticks(ys)
    ax.set_yticklabels([u.name for u in units], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"loss ({result.meta.get('loss_unit')} worse than FP)")
    ax.set_title(
        f"{result.meta.get('model')} on {result.meta.get('preset')}: {result.meta.get('metric')}"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def placement_markdown(report: dict[str, Any]) -> str:
    """The placement run: budget, chosen digital units, search steps, verification."""
    meta, unit = report["meta"], report["meta"]["loss_unit"]
    d = _digits(unit)
    budget, held = report["budget"], report["verification"]
    verdict = "**met**" if held["passed"] else "**NOT met**"
    lines = [f"# Mixed placement: {meta.get('model')} on {meta.get('preset')}", ""]
    lines += [f"- {line}" for line in _header(meta)]
    lines += [
        f"- budget `{budget['key']}` = {budget['max_loss']} {unit}"
        + (
            f"; kept digital by the budget: {budget['keep_digital']}"
            if budget["keep_digital"]
            else ""
        )
        + (f"; kept analog: {budget['keep_analog']}" if budget["keep_analog"] else ""),
        f"- selection data ({meta.get('data')}, even documents): every unit analog "
        f"{_pm(report['all_analog_loss'], d)} {unit}; "
        f"placement {_pm(report['selection_losses'], d)} {unit}",
        f"- held-out data (odd documents), fresh noise seeds {held['seeds']}: FP score "
        f"{_score(held['fp_score'], unit)}, placement loss {_pm(held['losses'], d)} {unit}: "
        f"budget {verdict}",
        f"- kept digital: {len(report['digital'])} of {report['n_units']} units, "
        f"{report['digital_params']:,} of {report['params']:,} analog-capable parameters "
        f"({100 * report['digital_params'] / max(1, report['params']):.1f} %)",
        f"- ranking: {report['ranking_from']} ({report['ranking_metric']}), recovery per "
        "parameter kept digital",
        f"- placement file: `{report['placement_file']}`",
        "",
        "| kept digital | params |",
        "|---|---:|",
    ]
    lines += [f"| `{n}` | {p:,} |" for n, p in report["digital_units"]] or ["| (none) | 0 |"]
    lines += [
        "",
        "Search (selection data):",
        "",
        f"| step | action | unit | digital | loss ({unit}) |",
    ]
    lines.append("|---:|---|---|---:|---:|")
    for i, s in enumerate(report["steps"], 1):
        name = f"`{s['unit']}`" if s["unit"] else "-"
        lines.append(f"| {i} | {s['action']} | {name} | {s['digital']} | {_pm(s['losses'], d)} |")
    return "\n".join(lines) + "\n"


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _time(ns: float) -> str:
    for scale, name in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if ns >= scale:
            return f"{ns / scale:.3g} {name}"
    return f"{ns:.3g} ns"


def _energy(nj: float) -> str:
    for scale, name in ((1e9, "J"), (1e6, "mJ"), (1e3, "µJ")):
        if nj >= scale:
            return f"{nj / scale:.3g} {name}"
    return f"{nj:.3g} nJ"


def cost_markdown(report: CostReport) -> str:
    """One model on one chip: mapping, per-token work, digital share, latency, energy."""
    d = report.to_dict()
    chip = report.chip
    lines = [
        f"# Chip cost: {report.model} on {chip.name}",
        "",
        f"- model config: {report.config_source}; {report.params:,} parameters "
        f"({report.analog_params:,} analog, {report.digital_params:,} in digital matrices)",
        f"- chip: {chip.crossbar_rows}×{chip.crossbar_cols} crossbars, {chip.cores} cores × "
        f"{chip.crossbars_per_core} crossbar(s), {chip.dac_bits}-bit DAC / {chip.adc_bits}-bit "
        f"ADC, {chip.mvm_time_ns:g} ns and {chip.mvm_energy_nj:g} nJ per MVM, digital "
        f"{chip.digital_ops_per_s / 1e12:g} TOPS at {chip.digital_energy_pj:g} pJ/op",
        f"- chip source: {chip.source}",
        f"- per token at context {report.context}"
        + (f", LoRA rank {report.lora_rank}" if report.lora_rank else ""),
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| crossbars needed (weight-stationary) | {report.crossbars:,} |",
        f"| cores needed | {report.cores_needed:,} |",
        f"| fits one chip | {'yes' if report.fits else f'no: {report.chips_needed:,} chips'} |",
        f"| crossbar utilisation | {100 * report.utilisation:.1f} % |",
        f"| analog MACs / token | {report.analog_macs:,} |",
        f"| ADC conversions / token | {report.adc_conversions:,} |",
        f"| DAC conversions / token | {report.dac_conversions:,} |",
        f"| crossbar MVMs / token | {report.mvms:,} |",
        f"| digital operations / token | {report.digital_ops_total:,} |",
        f"| digital share of operations | {100 * report.digital_share:.1f} % |",
        f"| latency / token (analog + digital) | {_time(d['latency_ns']['total'])} "
        f"({_time(d['latency_ns']['analog'])} + {_time(d['latency_ns']['digital'])}) |",
        f"| energy / token (analog + digital) | {_energy(d['energy_nj']['total'])} "
        f"({_energy(d['energy_nj']['analog'])} + {_energy(d['energy_nj']['digital'])}) |",
        "",
        "| digital work | operations / token | share of digital |",
        "|---|---:|---:|",
    ]
    total = max(1, report.digital_ops_total)
    for key, value in report.digital_ops.items():
        lines.append(f"| {key} | {value:,} | {100 * value / total:.1f} % |")
    if report.uncounted:
        lines.append(f"\nNot counted (unknown weights): {', '.join(report.uncounted)}")
    return "\n".join(lines) + "\n"


def cost_table(reports: Sequence[CostReport]) -> str:
    """Several models (or chips) side by side, one row each."""
    lines = [
        "| model | chip | params | crossbars | fits | util. | analog MACs/token | ADC conv./token "
        "| digital share | latency/token | energy/token |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        d = r.to_dict()
        fits = "yes" if r.fits else f"no ({r.chips_needed:,} chips)"
        lines.append(
            f"| {r.model} | {r.chip.name} | {_si(r.params, '')} | {r.crossbars:,} | {fits} | "
            f"{100 * r.utilisation:.0f} % | {_si(r.analog_macs, '')} | "
            f"{_si(r.adc_conversions, '')} | "
            f"{100 * r.digital_share:.1f} % | {_time(d['latency_ns']['total'])} | "
            f"{_energy(d['energy_nj']['total'])} |"
        )
    return "\n".join(lines) + "\n"
