"""Runners for the evaluation loop: score a model as it is now, on a list of tasks.

* :class:`LmEvalRunner` — any lm-eval task / group / tag / YAML path through the
  ``"afm"`` lm-eval model (:class:`afm.evaluate.lm_eval_model.AfmLM`); tasks are validated and
  loaded once, requests rebuilt with a fixed few-shot seed for every condition.
* :class:`ToyRunner` — a fast path for the bundled toy-world tasks through
  ``afm.toyworld.scoring`` (no lm-eval).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from afm.evaluate.specs import EvalInputError, TaskSpec, bundled_tasks_dir
from afm.toyworld.scoring import evaluate_arith, evaluate_facts
from afm.toyworld.world import ArithProblem, FactQuestion

__all__ = ["LmEvalRunner", "ToyRunner", "doc_indices", "spread_indices"]

logger = logging.getLogger(__name__)

_METRIC_PREFERENCE = ("exact_match", "acc", "prompt_level_strict_acc", "f1", "mcc", "bleu")


def _pick_metric(
    result: dict[str, Any], wanted: str | None, declared: Sequence[str] = ()
) -> tuple[str, float]:
    """The reported metric: ``wanted``, else the task's first declared metric, else the
    first of exact_match, acc, ...; keys look like ``"acc,none"`` (metric, filter)."""
    numeric = {
        k: v
        for k, v in result.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and "stderr" not in k
        and k.split(",")[0] not in ("sample_len", "samples", "sample_count")
    }
    if wanted is not None:
        for key in (wanted, f"{wanted},none"):
            if key in numeric:
                return key, float(numeric[key])
        raise EvalInputError(f"metric {wanted!r} not in the task's results {sorted(numeric)}")
    for pref in list(declared) + list(_METRIC_PREFERENCE):
        for key, value in numeric.items():
            if key.split(",")[0] == pref:
                return key, float(value)
    if not numeric:
        raise EvalInputError(f"no numeric metric in results {sorted(result)}")
    key = next(iter(numeric))
    return key, float(numeric[key])


def _declared_metrics(tasks: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for task in tasks:
        for m in getattr(getattr(task, "config", None), "metric_list", None) or []:
            name = m.get("metric") if isinstance(m, dict) else None
            if isinstance(name, str) and name not in out:
                out.append(name)
    return out


def spread_indices(n_total: int, limit: int | float | None) -> list[int]:
    """``limit`` evenly spaced indices of ``range(n_total)`` (a fraction < 1 of them);
    all of them when ``limit`` is None or not smaller."""
    if limit is None:
        return list(range(n_total))
    k = int(limit) if limit >= 1 else max(1, int(limit * n_total))
    if k >= n_total:
        return list(range(n_total))
    return [int(i * n_total / k) for i in range(k)]


def doc_indices(
    n_total: int,
    limit: int | float | None = None,
    *,
    spread: bool = False,
    split: tuple[int, int] | None = None,
) -> list[int]:
    """The documents an evaluation uses: those of ``split = (part, parts)`` (index mod
    ``parts`` equals ``part``: disjoint halves for selection and held-out data with
    ``(0, 2)`` and ``(1, 2)``; all without a split), then ``limit`` of them, evenly spaced
    with ``spread``, else the first ones."""
    idx = list(range(n_total))
    if split is not None:
        part, parts = split
        idx = idx[part::parts]
    if spread:
        return [idx[i] for i in spread_indices(len(idx), limit)]
    if limit is None:
        return idx
    return idx[: int(limit) if limit >= 1 else max(1, int(limit * len(idx)))]


def _check_split(split: tuple[int, int] | None) -> tuple[int, int] | None:
    if split is None:
        return None
    ok = isinstance(split, (tuple, list)) and len(split) == 2
    if ok and all(isinstance(v, int) and not isinstance(v, bool) for v in split):
        part, parts = split
        if parts >= 1 and 0 <= part < parts:
            return (part, parts)
    raise EvalInputError(f"split={split!r} is invalid: expected (part, parts), 0 <= part < parts")


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


_NAME_RE = re.compile(r"^\s*-?\s*(?:task|group|tag)\s*:\s*[\"']?([A-Za-z0-9_\-.]+)", re.M)


@functools.lru_cache(maxsize=1)
def _builtin_task_text() -> tuple[str, frozenset[str]]:
    """All of lm-eval's task YAML text and file names (a name absent from it is surely
    not a task: no need for the ~20 s index), plus the names for suggestions."""
    import lm_eval

    root = Path(lm_eval.__file__).resolve().parent / "tasks"
    parts, names = [], set()
    for f in root.rglob("*.yaml"):
        text = f.read_text(errors="ignore")
        parts += [f.stem, text]
        names.update(_NAME_RE.findall(text))
    return "\n".join(parts), frozenset(names)


class LmEvalRunner:
    """Runs lm-eval tasks on a model through :class:`afm.evaluate.lm_eval_model.AfmLM`.

    Tasks are validated and loaded once (``TaskManager`` with the bundled toy-world
    tasks and ``include_path``); every run rebuilds the requests with a fixed few-shot
    seed, so all conditions see the same prompts.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        include_path: Sequence[str | Path] | None = None,
        limit: int | float | None = None,
        spread: bool = False,
        batch_size: int = 16,
        fewshot_seed: int = 1234,
        gen_kwargs: dict[str, Any] | None = None,
        split: tuple[int, int] | None = None,
    ) -> None:
        try:
            import lm_eval.tasks  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("afm-eval needs lm-eval: pip install 'afm[lm-eval]'") from err
        if not tasks:
            raise EvalInputError("no tasks given")
        paths = [str(bundled_tasks_dir())] + [str(p) for p in include_path or []]
        for p in paths[1:]:
            if not Path(p).exists():
                raise EvalInputError(f"include path {p!r} does not exist")
        self.batch_size = batch_size
        self.fewshot_seed = fewshot_seed
        self.gen_kwargs = gen_kwargs
        self.specs = list(tasks)
        self.limit = limit
        self.spread = spread
        self.split = _check_split(split)
        # Indexing lm-eval's own ~200 task folders takes tens of seconds: skip it when
        # every task is bundled, in include_path or a YAML file.
        self.task_manager = _task_manager(tuple(paths), False)
        known = set(self.task_manager.all_tasks)
        missing = [
            s.task
            for s in self.specs
            if s.task not in known and not s.task.endswith((".yaml", ".yml"))
        ]
        for name in missing:  # cheap check before the slow full index
            text, names = _builtin_task_text()
            if name not in text:
                close = difflib.get_close_matches(name, sorted(known | names), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise EvalInputError(f"unknown task {name!r}{hint}")
        if missing:
            self.task_manager = _task_manager(tuple(paths), True)
            known = set(self.task_manager.all_tasks)
        for spec in self.specs:
            is_yaml = spec.task.endswith((".yaml", ".yml"))
            if is_yaml and not Path(spec.task).is_file():
                raise EvalInputError(f"task file {spec.task!r} does not exist")
            if not is_yaml and spec.task not in known:
                close = difflib.get_close_matches(spec.task, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise EvalInputError(f"unknown task {spec.task!r}{hint}")
        self.loaded: list[tuple[TaskSpec, dict[str, Any], list[str]]] = []
        for spec in tqdm(self.specs, desc="loading tasks", disable=len(self.specs) < 3):
            try:
                loaded = self.task_manager.load([spec.task])
            except (KeyError, ValueError, FileNotFoundError) as err:
                raise EvalInputError(f"cannot load task {spec.task!r}: {err}") from err
            for task_obj in loaded["tasks"].values():
                if gen_kwargs and task_obj.get_config("output_type") == "generate_until":
                    task_obj.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
                if spec.num_fewshot is not None:
                    task_obj.set_config(key="num_fewshot", value=spec.num_fewshot)
                elif task_obj.get_config("num_fewshot") is None:
                    task_obj.set_config(key="num_fewshot", value=0)
            names = self._report_names(spec, loaded)
            self.loaded.append((spec, loaded, names))
        self._lm: Any = None
        self._lm_model: nn.Module | None = None

    @staticmethod
    def _report_names(spec: TaskSpec, loaded: dict[str, Any]) -> list[str]:
        if spec.task in loaded["tasks"] or spec.task in loaded.get("groups", {}):
            return [spec.task]
        if len(loaded["tasks"]) == 1 or spec.task.endswith((".yaml", ".yml")):
            groups = list(loaded.get("groups", {}))
            return groups[:1] if groups else list(loaded["tasks"])[:1]
        return list(loaded["tasks"])  # a tag: one row per task

    def reset_model(self) -> None:
        self._lm, self._lm_model = None, None

    def lm(self, model: nn.Module, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model is not model:
            from afm.evaluate.lm_eval_model import AfmLM

            self._lm = AfmLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            self._lm_model = model
        return self._lm

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, tuple[str, float]]:
        from lm_eval.evaluator import evaluate

        lm = self.lm(model, tokenizer)
        out: dict[str, tuple[str, float]] = {}
        for spec, loaded, names in self.loaded:
            for task_obj in loaded["tasks"].values():
                task_obj.set_fewshot_seed(seed=self.fewshot_seed)
            torch.manual_seed(self.fewshot_seed)
            limit = spec.limit if spec.limit is not None else self.limit
            samples = None
            if self.split is not None or (self.spread and limit is not None):
                samples = {  # a part of the docs, or evenly spaced docs instead of the first
                    name: doc_indices(
                        len(task_obj.eval_docs), limit, spread=self.spread, split=self.split
                    )
                    for name, task_obj in loaded["tasks"].items()
                }
                limit = None
            res = evaluate(
                lm=lm,
                task_dict=loaded,
                limit=limit,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
            )
            if res is None:  # not rank 0
                continue
            declared = _declared_metrics(list(loaded["tasks"].values()))
            for name in names:
                out[name] = _pick_metric(res["results"][name], spec.metric, declared)
        return out


class ToyRunner:
    """Fast toy-world accuracy without lm-eval (the same test problems as the bundled
    ``toyworld_arith`` / ``toyworld_facts`` tasks, greedy / log-likelihood scoring)."""

    TASKS = ("toyworld_arith", "toyworld_facts")

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        limit: int | None = None,
        batch_size: int = 64,
        spread: bool = False,
        split: tuple[int, int] | None = None,
    ) -> None:
        bad = [t for t in tasks if t not in self.TASKS]
        if bad:
            raise EvalInputError(f"the fast path knows only {list(self.TASKS)}, not {bad}")
        if limit is not None and limit <= 0:
            raise EvalInputError(f"limit must be > 0, got {limit}")
        self.tasks = list(tasks)
        self.limit = limit
        self.spread = spread
        self.split = _check_split(split)
        self.batch_size = batch_size
        self._data = {t: self._load(t) for t in self.tasks}

    def _load(self, task: str) -> list[Any]:
        kind = task.split("_", 1)[1]
        path = bundled_tasks_dir() / "toyworld" / f"{kind}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [
            rows[i]
            for i in doc_indices(len(rows), self.limit, spread=self.spread, split=self.split)
        ]
        if kind == "arith":
            return [ArithProblem(int(r["a"]), int(r["b"]), r["op"]) for r in rows]
        return [
            FactQuestion(
                r["entity"], r["attribute"], 0, r["question"], tuple(r["choices"]), int(r["gold"])
            )
            for r in rows
        ]

    def reset_model(self) -> None:
        pass

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, tuple[str, float]]:
        out = {}
        for task in self.tasks:
            if task == "toyworld_arith":
                acc = evaluate_arith(model, tokenizer, self._data[task], batch_size=self.batch_size)
                out[task] = ("exact_match,answer", float(acc))
            else:
                acc = evaluate_facts(model, tokenizer, self._data[task], batch_size=self.batch_size)
                out[task] = ("acc,none", float(acc))
        return out
