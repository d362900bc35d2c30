"""Results of ``afm-eval``: mean ± std aggregation, markdown / JSON reports and plots.

A run produces :class:`ResultRow` objects, one per (model, condition, task), each with
the per-seed scores.  :class:`EvalReport` turns them into a markdown table (models ×
conditions as rows, tasks as columns, cells ``mean ± std``), a JSON file (every
per-seed score kept) and PNG plots (accuracy vs drift time or vs a swept parameter,
one line per model).  Plotting uses matplotlib's Agg backend and is imported lazily.

``std`` is the sample standard deviation (``ddof=1``) over seeds; it is 0 for a
single seed (deterministic conditions such as FP are evaluated once).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ResultRow", "EvalReport", "mean_std", "plot_lines", "load_report", "pyplot"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std with ddof=1)``; std is 0 for one value; NaN for none."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


@dataclass
class ResultRow:
    """Scores of one model on one task under one condition, one entry per seed."""

    model: str
    task: str
    metric: str
    condition: str
    scores: list[float]
    seeds: list[int | None]
    x: float | None = None
    """The condition's position on the plot's x axis (drift seconds, noise scale, bits)."""
    x_name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return mean_std(self.scores)[0]

    @property
    def std(self) -> float:
        return mean_std(self.scores)[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["n"] = self.mean, self.std, len(self.scores)
        return d


def _fmt(mean: float, std: float, n: int, scale: float) -> str:
    if math.isnan(mean):
        return "—"
    if n <= 1:
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


@dataclass
class EvalReport:
    """All rows of a run plus free-form metadata (the command, limits, models...)."""

    rows: list[ResultRow]
    meta: dict[str, Any] = field(default_factory=dict)
    title: str = "afm-eval"
    layout: str = "tasks"
    """Markdown layout: ``"tasks"`` (a column per task) or ``"conditions"`` (a table per
    task, a column per condition: sweeps and test-time-compute curves)."""

    # -- queries -------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(f"{r.task}" for r in self.rows))

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(r.condition for r in self.rows))

    def get(self, model: str, condition: str, task: str) -> ResultRow | None:
        for r in self.rows:
            if (r.model, r.condition, r.task) == (model, condition, task):
                return r
        return None

    # -- output --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "layout": self.layout,
            "meta": self.meta,
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_markdown(self, percent: bool = True) -> str:
        """``layout="tasks"``: one row per (model, condition), one column per task (+ mean);
        ``layout="conditions"``: per task, one row per model, one column per condition."""
        scale = 100.0 if percent else 1.0
        if self.layout == "conditions":
            return self._markdown_by_condition(scale, percent)
        tasks = self.tasks
        metrics = {t: next(r.metric for r in self.rows if r.task == t) for t in tasks}
        header = ["model", "condition", "seeds"] + [f"{t} ({metrics[t]})" for t in tasks]
        if len(tasks) > 1:
            header.append("average")
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for model in self.models:
            for cond in self.conditions:
                cells, means = [], []
                n_seeds = 0
                for t in tasks:
                    row = self.get(model, cond, t)
                    if row is None:
                        cells.append("—")
                        continue
                    n_seeds = max(n_seeds, len(row.scores))
                    means.append(row.mean)
                    cells.append(_fmt(row.mean, row.std, len(row.scores), scale))
                if not means:
                    continue
                line = [model, cond, str(n_seeds)] + cells
                if len(tasks) > 1:
                    avg = sum(means) / len(means) if len(means) == len(tasks) else math.nan
                    line.append(_fmt(avg, 0.0, 1, scale))
                lines.append("| " + " | ".join(line) + " |")
        unit = "%, " if percent else ""
        lines += ["", f"Cells: mean ± sample std over seeds ({unit}ddof = 1)."]
        return "\n".join(lines) + "\n"

    def _markdown_by_condition(self, scale: float, percent: bool) -> str:
        lines = [f"### {self.title}", ""]
        for task in self.tasks:
            rows = [r for r in self.rows if r.task == task]
            conds = list(dict.fromkeys(r.condition for r in rows))
            lines += [
                f"**{task}** ({rows[0].metric})",
                "",
                "| model | " + " | ".join(conds) + " |",
                "|---|" + "---|" * len(conds),
            ]
            for model in dict.fromkeys(r.model for r in rows):
                cells = []
                for c in conds:
                    row = self.get(model, c, task)
                    cells.append(
                        "—" if row is None else _fmt(row.mean, row.std, len(row.scores), scale)
                    )
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
        unit = "%, " if percent else ""
        lines.append(f"Cells: mean ± sample std over seeds ({unit}ddof = 1).")
        return "\n".join(lines) + "\n"

    def write(
        self,
        out_dir: str | Path,
        stem: str = "results",
        plot: bool = True,
        percent: bool = True,
    ) -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.json`` and (if any row has an x) ``<stem>.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
        paths["markdown"].write_text(self.to_markdown(percent=percent))
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        if plot and any(r.x is not None for r in self.rows):
            paths["png"] = out / f"{stem}.png"
            plot_lines(self, paths["png"], percent=percent)
        return paths


def load_report(path: str | Path) -> EvalReport:
    """Read a report written by :meth:`EvalReport.write` (its JSON)."""
    data = json.loads(Path(path).read_text())
    keep = {"model", "task", "metric", "condition", "scores", "seeds", "x", "x_name", "params"}
    rows = [ResultRow(**{k: v for k, v in r.items() if k in keep}) for r in data["rows"]]
    return EvalReport(
        rows, data.get("meta", {}), data.get("title", "afm-eval"), data.get("layout", "tasks")
    )


# ------------------------------------------------------------------------------ plots
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (an ImportError names the extra to install)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'afm[plot]' (or 'afm[lm-eval]')"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _drift_axis(ax: Any, xs: Sequence[float]) -> None:
    from afm.analog.noise.durations import format_duration

    ax.set_xscale("symlog", linthresh=1.0)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_duration(t) for t in ticks], rotation=30)
    ax.set_xlabel("time after programming")


def plot_lines(report: EvalReport, path: str | Path, percent: bool = True) -> Path:
    """Accuracy vs the rows' x (drift time, noise scale, bits): one panel per task,
    one line per model (and per series when a sweep has several axes), error bars ±std."""
    plt = pyplot()
    scale = 100.0 if percent else 1.0
    rows = [r for r in report.rows if r.x is not None]
    tasks = list(dict.fromkeys(r.task for r in rows))
    x_names = list(dict.fromkeys(r.x_name or "x" for r in rows))
    ncols = len(x_names)
    nrows = len(tasks)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    names = list(dict.fromkeys(r.model for r in report.rows))
    color = {m: cycle[k % len(cycle)] for k, m in enumerate(names)}
    for i, task in enumerate(tasks):
        for j, x_name in enumerate(x_names):
            ax = axes[i][j]
            sel = [r for r in rows if r.task == task and (r.x_name or "x") == x_name]
            series = list(dict.fromkeys(r.model for r in sel))
            for s in series:
                pts = sorted((r for r in sel if r.model == s), key=lambda r: r.x)
                ax.errorbar(
                    [r.x for r in pts],
                    [r.mean * scale for r in pts],
                    yerr=[r.std * scale for r in pts],
                    marker="o",
                    capsize=3,
                    label=s,
                    color=color[s],
                )
            if x_name == "drift_time":
                _drift_axis(ax, [r.x for r in sel])
            elif x_name == "N":
                ax.set_xscale("log", base=2)
                ticks = sorted({r.x for r in sel})
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{t:g}" for t in ticks])
                ax.set_xlabel("N (samples per problem)")
            else:
                ax.set_xlabel(x_name)
            for ref in (r for r in report.rows if r.x is None and r.task == task):
                ax.axhline(
                    ref.mean * scale,
                    linestyle="--",
                    linewidth=1,
                    color=color[ref.model],
                    label=f"{ref.model} {ref.condition}",
                )
            metric = sel[0].metric if sel else ""
            ax.set_ylabel(f"{metric}{' (%)' if percent else ''}")
            ax.set_title(task)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(report.title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
