"""Evaluate afm models on a simulated chip: lm-eval tasks under deployment noise.

The building blocks behind ``afm-eval`` (see ``docs/evaluation.md``):

* :class:`ModelSpec` — which model: an afm checkpoint, a plain HF model, or a plain
  HF model converted on the fly with a preset (``preset="afm-paper"``; its input ranges
  are calibrated on a few batches), optionally RTN-W4 quantized first
  (``afm.baselines.rtn_w4``).  Parsed from ``"path=tiny,label=teacher,preset=afm-paper"``.
* :class:`TaskSpec` — an lm-eval task / group / tag name or YAML path with its
  few-shot count, metric and limit; suites are YAML files (``eval/suites/``).
* :class:`Condition` — a deployment noise model (``afm.noise``) applied once per seed
  and restored afterwards, optionally with analog-config changes (bit widths).
  :func:`make_conditions` builds FP / noise / drift-time conditions.
* Runners (:mod:`afm.eval_runners`, also importable from here): ``LmEvalRunner`` (any
  lm-eval task through the ``"afm"`` lm-eval model, :mod:`afm.lm_eval_model`) and
  ``ToyRunner`` (a fast path for the toy-world tasks through
  ``afm.toyworld.evaluate_arith`` / ``evaluate_facts``).
* :func:`run_evaluation` — models × conditions × seeds → :class:`afm.report.EvalReport`.

``lm_eval`` is imported only when an :class:`LmEvalRunner` is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from afm.noise import NoiseModel, apply_noise_, format_duration, get_noise_model, parse_duration
from afm.report import EvalReport, ResultRow

__all__ = [
    "EvalInputError",
    "ModelSpec",
    "TaskSpec",
    "Condition",
    "load_suite",
    "parse_tasks",
    "make_conditions",
    "check_model_spec",
    "load_model_spec",
    "analog_config_changes",
    "run_evaluation",
    "bundled_tasks_dir",
]

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EvalInputError(ValueError):
    """Bad user input (unknown task, missing checkpoint, bad duration, N <= 0...)."""


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise EvalInputError(f"{key}={value!r}: expected true/false")


def _as_int(key: str, value: Any, minimum: int | None = None) -> int:
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
        rtn_w4: quantize the linear weights with RTN-W4 first (``afm.baselines``).
        group_size: the RTN group size (None: per output channel).
        calib: input-range calibration after an on-the-fly conversion:
            ``"toyworld"`` (toy-world training documents, offline), a text / jsonl file
            (one document a line, or ``{"text": ...}``), or ``"none"``.
        calib_steps: calibration batches (of 8 sequences).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    path: str
    label: str | None = None
    preset: str | None = None
    rtn_w4: bool = False
    group_size: int | None = None
    calib: str = "toyworld"
    calib_steps: int = 16
    dtype: str = "float32"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        name = Path(self.path).name if Path(self.path).exists() else self.path
        if self.rtn_w4:
            name += "+rtn-w4"
        if self.preset:
            name += f"@{self.preset}"
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
            kwargs["rtn_w4"] = _as_bool("rtn_w4", kwargs["rtn_w4"])
        for key in ("group_size", "calib_steps"):
            if key in kwargs:
                kwargs[key] = (
                    None if kwargs[key].lower() == "none" else _as_int(key, kwargs[key], minimum=1)
                )
        if kwargs.get("preset", "").lower() in ("", "none"):
            kwargs.pop("preset", None)
        return cls(**kwargs)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _calibration_texts(source: str, n: int) -> list[str]:
    if source == "toyworld":
        from afm.toyworld import training_documents

        docs = training_documents()
        return [next(docs) for _ in range(n)]
    path = Path(source)
    if not path.is_file():
        raise EvalInputError(
            f"calibration data {source!r} is neither 'toyworld', 'none' nor a file"
        )
    texts = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            line = json.loads(line).get("text", "")
        texts.append(line)
        if len(texts) >= n:
            break
    if not texts:
        raise EvalInputError(f"calibration file {source!r} has no text")
    return texts


def _calibrate(model: nn.Module, tokenizer: Any, spec: ModelSpec, device: torch.device) -> None:
    import afm

    texts = _calibration_texts(spec.calib, spec.calib_steps * 8)
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batches = []
        for i in range(0, len(texts), 8):
            enc = tokenizer(
                texts[i : i + 8],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=min(512, getattr(tokenizer, "model_max_length", 512) or 512),
            )
            batches.append(
                {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            )
    finally:
        tokenizer.padding_side = old
    n = afm.calibrate_input_ranges_(model, batches, max_steps=len(batches), progress=False)
    logger.info("calibrated input ranges of %s on %d batches (%s)", spec.name, n, spec.calib)


def check_model_spec(spec: ModelSpec) -> None:
    """Cheap checks before anything is loaded: dtype, preset, calibration source, and
    that a local path (absolute, ``./``, ``~``, or the ``tiny`` alias) exists."""
    from afm.models import resolve_model
    from afm.presets import PRESETS

    if spec.dtype not in _DTYPES:
        raise EvalInputError(f"dtype={spec.dtype!r}: choose one of {sorted(_DTYPES)}")
    if spec.preset is not None and spec.preset not in PRESETS:
        raise EvalInputError(f"unknown preset {spec.preset!r}; available: {', '.join(PRESETS)}")
    if spec.calib not in ("toyworld", "none") and not Path(spec.calib).is_file():
        raise EvalInputError(
            f"calibration data {spec.calib!r} is neither 'toyworld', 'none' nor a file"
        )
    resolved = resolve_model(spec.path)
    local = resolved.startswith((".", "/", "~")) or resolved != spec.path
    if local and not (Path(resolved).expanduser() / "config.json").is_file():
        raise EvalInputError(f"checkpoint {spec.path!r} not found (no config.json in {resolved})")


def load_model_spec(spec: ModelSpec, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load (and convert / quantize / calibrate) a model and its tokenizer, in eval mode."""
    import afm  # noqa: F401  (registers the "afm" quantizer: analog checkpoints load analog)
    from afm.models import ModelNotFoundError, load_model, load_tokenizer

    check_model_spec(spec)
    try:
        model = load_model(spec.path, dtype=_DTYPES[spec.dtype])
        tokenizer = load_tokenizer(spec.path)
    except ModelNotFoundError as err:
        raise EvalInputError(str(err).split(". Known aliases")[0]) from err
    except OSError as err:
        raise EvalInputError(f"cannot load model {spec.path!r}: {err}") from err
    device = torch.device(device)
    model.to(device)
    if spec.rtn_w4:
        try:
            from afm.baselines import rtn_w4
        except ImportError as err:  # pragma: no cover
            raise EvalInputError(f"rtn_w4 needs afm.baselines.rtn_w4 ({err})") from err
        try:
            model = rtn_w4(model, group_size=spec.group_size) or model
        except ValueError as err:
            raise EvalInputError(f"rtn_w4: {err}") from None
    if spec.preset is not None:
        try:
            config = afm.get_preset(spec.preset)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
        afm.convert(model, config)
        if config.input.uses_range and spec.calib.lower() != "none":
            _calibrate(model, tokenizer, spec, device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


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
    data = yaml.safe_load(p.read_text()) or {}
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
        specs.append(
            TaskSpec(
                str(entry["task"]),
                entry.get("num_fewshot"),
                entry.get("metric"),
                entry.get("limit"),
            )
        )
    meta = {k: v for k, v in data.items() if k != "tasks"}
    meta["suite_path"] = str(p)
    return specs, meta


def bundled_tasks_dir() -> Path:
    """The bundled toy-world lm-eval tasks (``eval/tasks``, installed as ``afm.tasks``)."""
    try:
        from afm.toyworld import tasks_dir

        return tasks_dir()
    except (ImportError, ModuleNotFoundError):  # pragma: no cover
        return Path(__file__).resolve().parent.parent / "eval" / "tasks"


# ---------------------------------------------------------------------------- conditions
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


def _seed_list(seeds: int | Sequence[int]) -> tuple[int, ...]:
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
    seed_list = _seed_list(seeds)
    opts = dict(noise_options or {})
    try:
        base = get_noise_model(noise, **opts)
    except (ValueError, TypeError) as err:
        raise EvalInputError(str(err)) from None
    if not drift_times:
        conds.append(Condition(base.label, base, seed_list, params={"noise": base.to_dict()}))
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
                seed_list,
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
    from afm.config import OutputQuantConfig, set_by_path
    from afm.patch import analog_layers

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


# ---------------------------------------------------------------------------- runners
class Runner(Protocol):
    """Scores a model as it is now (``afm.eval_runners``: lm-eval and toy-world)."""

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, tuple[str, float]]:
        """``{task: (metric, score)}`` for the model as it is now."""
        ...

    def reset_model(self) -> None:
        """Forget any per-model state (called when a new model starts)."""
        ...


def __getattr__(name: str) -> Any:  # lazy re-exports (afm.eval_runners imports this module)
    if name in ("LmEvalRunner", "ToyRunner"):
        from afm import eval_runners

        return getattr(eval_runners, name)
    raise AttributeError(f"module 'afm.evaluate' has no attribute {name!r}")


# ---------------------------------------------------------------------------- the loop
def run_evaluation(
    models: Sequence[ModelSpec | tuple[str, nn.Module, Any]],
    runner: Runner,
    conditions: Sequence[Condition],
    *,
    device: str | torch.device = "cpu",
    title: str = "afm-eval",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Every model × condition × seed through ``runner``; noise restored after each seed.

    ``models`` are :class:`ModelSpec` (loaded one at a time) or ``(label, model,
    tokenizer)`` triples already in memory.
    """
    if not models:
        raise EvalInputError("no models given")
    if not conditions:
        raise EvalInputError("no conditions given")
    rows: dict[tuple[str, str, str], ResultRow] = {}
    total = sum(len(c.seeds) for c in conditions) * len(models)
    bar = tqdm(total=total, desc="conditions × seeds", disable=not progress)
    for item in models:
        if isinstance(item, ModelSpec):
            label = item.name
            bar.set_postfix_str(f"loading {label}")
            model, tokenizer = load_model_spec(item, device)
        else:
            label, model, tokenizer = item
        runner.reset_model()
        for cond in conditions:
            for seed in cond.seeds:
                bar.set_postfix_str(f"{label} | {cond.label} | seed {seed}")
                with analog_config_changes(model, cond.config_changes):
                    handle = apply_noise_(model, cond.noise, seed) if cond.noise else None
                    try:
                        scores = runner.run(model, tokenizer)
                    finally:
                        if handle is not None:
                            handle.restore()
                for task, (metric, score) in scores.items():
                    key = (label, cond.label, task)
                    if key not in rows:
                        rows[key] = ResultRow(
                            label,
                            task,
                            metric,
                            cond.label,
                            [],
                            [],
                            cond.x,
                            cond.x_name,
                            dict(cond.params),
                        )
                    rows[key].scores.append(score)
                    rows[key].seeds.append(seed if cond.noise else None)
                bar.update(1)
        if isinstance(item, ModelSpec):
            del model
    bar.close()
    return EvalReport(list(rows.values()), dict(meta or {}), title)
