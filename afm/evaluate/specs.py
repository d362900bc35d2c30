"""What to evaluate: models, tasks and suites, parsed from user input.

* :class:`ModelSpec` — which model: an afm checkpoint, a plain HF model, or a plain
  HF model converted on the fly with a preset (``preset="afm-paper"``; its input ranges
  are calibrated on a few batches), optionally RTN-W4 quantized first
  (``afm.export.rtn.rtn_w4``).  Parsed from ``"path=tiny,label=teacher,preset=afm-paper"``.
* :class:`TaskSpec` — an lm-eval task / group / tag name or YAML path with its
  few-shot count, metric and limit; suites are YAML files (``eval/suites/``).

Bad input raises :class:`EvalInputError` (a ``ValueError``) naming the value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afm.toyworld.world import tasks_dir

__all__ = [
    "EvalInputError",
    "ModelSpec",
    "TaskSpec",
    "as_bool",
    "as_int",
    "bundled_tasks_dir",
    "load_suite",
    "parse_tasks",
]

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EvalInputError(ValueError):
    """Bad user input (unknown task, missing checkpoint, bad duration, N <= 0...)."""


def as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise EvalInputError(f"{key}={value!r}: expected true/false")


def as_int(key: str, value: Any, minimum: int | None = None) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise EvalInputError(f"{key}={value!r}: expected an integer") from None
    if isinstance(value, float) and value != out:
        raise EvalInputError(f"{key}={value!r}: expected an integer")
    if minimum is not None and out < minimum:
        raise EvalInputError(f"{key}={value!r}: must be >= {minimum}")
    return out


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate.

    Args:
        path: an alias (``"tiny"``), a local directory or a hub id.  afm checkpoints
            load with their analog layers.
        label: the name in tables and plots (default: ``path``, plus the transforms).
        preset: convert a plain model on the fly with this hardware preset.
        rtn_w4: quantize the linear weights with RTN-W4 first (``afm.export.rtn``).
        group_size: the RTN group size (None: per output channel).
        calib: input-range calibration after an on-the-fly conversion:
            ``"toyworld"`` (toy-world training documents, offline), a text / jsonl file
            (one document a line, or ``{"text": ...}``), or ``"none"``.
        calib_steps: calibration batches (of 8 sequences).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        placement: convert a plain model on the fly with an afm config file instead: a
            placement written by ``afm-plan place`` (only its layers become analog, the
            rest stays digital and sees no device noise) or an afm checkpoint's config.json.
        head: the output head's policy with ``preset`` (spec §7): ``"analog"`` (converted,
            programmed with the deployment noise) or ``"digital"`` (noise-free); None:
            the preset's (``afm.presets.analog_head_of``).  A checkpoint keeps its own.
    """

    path: str
    label: str | None = None
    preset: str | None = None
    rtn_w4: bool = False
    group_size: int | None = None
    calib: str = "toyworld"
    calib_steps: int = 16
    dtype: str = "float32"
    placement: str | None = None
    head: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        name = Path(self.path).name if Path(self.path).exists() else self.path
        if self.rtn_w4:
            name += "+rtn-w4"
        if self.preset:
            name += f"@{self.preset}"
        if self.placement:
            name += f"@{Path(self.placement).stem}"
        return name

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``"tiny"`` or ``"path=tiny,label=teacher,preset=afm-paper,rtn_w4=true"``."""
        text = text.strip()
        if not text:
            raise EvalInputError("empty model spec")
        if "=" not in text.split(",")[0]:
            first, _, rest = text.partition(",")
            text = f"path={first}" + (f",{rest}" if rest else "")
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise EvalInputError(
                    f"model spec {text!r}: bad entry {part!r}; keys: {sorted(names)}"
                )
            kwargs[key] = value.strip()
        if "path" not in kwargs:
            raise EvalInputError(f"model spec {text!r} has no path")
        if "rtn_w4" in kwargs:
            kwargs["rtn_w4"] = as_bool("rtn_w4", kwargs["rtn_w4"])
        for key in ("group_size", "calib_steps"):
            if key in kwargs:
                kwargs[key] = (
                    None if kwargs[key].lower() == "none" else as_int(key, kwargs[key], minimum=1)
                )
        for key in ("preset", "placement", "head"):
            if kwargs.get(key, "").lower() in ("", "none"):
                kwargs.pop(key, None)
        return cls(**kwargs)


# ---------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """An lm-eval task (name, group, tag or YAML path) with its evaluation settings."""

    task: str
    num_fewshot: int | None = None
    metric: str | None = None
    limit: int | float | None = None

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        """``"hellaswag"`` or ``"hellaswag:5"`` (5-shot)."""
        name, sep, shots = text.strip().rpartition(":")
        if sep and shots.isdigit() and name:
            return cls(name, int(shots))
        return cls(text.strip())


def parse_tasks(text: str | Sequence[str]) -> list[TaskSpec]:
    """``"a,b:5,c"`` or a list of such strings → task specs."""
    items = [text] if isinstance(text, str) else list(text)
    out = [TaskSpec.parse(t) for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise EvalInputError("no tasks given")
    return out


def load_suite(path: str | Path) -> tuple[list[TaskSpec], dict[str, Any]]:
    """Read a suite YAML: ``tasks: [{task, num_fewshot, metric, limit, enabled}]``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        from importlib.resources import files

        # eval/suites is installed as the package data of afm.suites
        bundled = files("afm.suites") / f"{path}.yaml"
        if bundled.is_file():
            p = Path(str(bundled))
        else:
            raise EvalInputError(f"suite {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        why = problem or " ".join(str(err).split()) or type(err).__name__
        raise EvalInputError(f"suite {str(p)!r} is not valid YAML ({where}{why})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise EvalInputError(f"suite {p}: expected a mapping with a 'tasks' list")
    specs = []
    for entry in data["tasks"]:
        if isinstance(entry, str):
            specs.append(TaskSpec(entry))
            continue
        if not isinstance(entry, dict) or "task" not in entry:
            raise EvalInputError(f"suite {p}: bad entry {entry!r}")
        if entry.get("enabled", True) is False:
            logger.info("suite %s: skipping %s (%s)", p, entry["task"], entry.get("note", ""))
            continue
        specs.append(_suite_task(p, entry))
    meta = {k: v for k, v in data.items() if k != "tasks"}
    meta["suite_path"] = str(p)
    return specs, meta


def _suite_task(path: Path, entry: dict[str, Any]) -> TaskSpec:
    """One ``tasks:`` entry of a suite, its fields checked (one line naming the entry)."""
    where = f"suite {str(path)!r}, task {entry['task']!r}"
    shots, metric, limit = entry.get("num_fewshot"), entry.get("metric"), entry.get("limit")
    if not isinstance(entry["task"], str) or not entry["task"].strip():
        raise EvalInputError(f"suite {str(path)!r}: task {entry['task']!r} is not a name")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise EvalInputError(f"{where}: num_fewshot={shots!r} must be an int >= 0")
    if metric is not None and not isinstance(metric, str):
        raise EvalInputError(f"{where}: metric={metric!r} must be a metric name")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < 1e12
    ):
        raise EvalInputError(f"{where}: limit={limit!r} must be a number > 0")
    return TaskSpec(entry["task"], shots, metric, limit)


def bundled_tasks_dir() -> Path:
    """The bundled toy-world lm-eval tasks (``eval/tasks``, installed as ``afm.tasks``)."""
    return tasks_dir()
