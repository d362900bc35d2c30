"""``afm-eval`` as one library call: an :class:`EvalRequest` in, a written report out.

The CLI (``afm.cli.evaluate``) only parses its arguments into an :class:`EvalRequest`
and calls :func:`run_eval_request`; notebooks and scripts can do the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm.analog.noise import DRIFT_TIMES
from afm.evaluate.conditions import Condition, make_conditions
from afm.evaluate.loading import check_model_spec
from afm.evaluate.loop import run_evaluation
from afm.evaluate.report import EvalReport
from afm.evaluate.runners import LmEvalRunner, ToyRunner
from afm.evaluate.specs import EvalInputError, ModelSpec, TaskSpec, load_suite, parse_tasks
from afm.evaluate.sweep import parse_value, sweep_conditions
from afm.evaluate.ttc import check_ns, default_ns, run_ttc
from afm.evaluate.ttc_sampling import LmEvalSource, ToyArithSource
from afm.validation import check_device, check_output_path

__all__ = ["EvalRequest", "run_eval_request"]


@dataclass
class EvalRequest:
    """Everything ``afm-eval`` takes (its flags, by the same names)."""

    models: list[str]
    tasks: str | None = None
    suite: str | None = None
    include_path: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: float | None = None
    spread: bool = False
    fast: bool = False
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None
    noise: str | None = None
    noise_opt: list[str] = field(default_factory=list)
    seeds: str = "10"
    drift_times: str | None = None
    no_fp: bool = False
    sweep: list[str] = field(default_factory=list)
    ttc: bool = False
    max_n: int = 64
    ns: str | None = None
    scorer: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    n_subsets: int = 1
    sample_seed: int = 0
    sample_batch: int = 256
    out: str = "eval/results"
    name: str | None = None
    title: str | None = None
    quiet: bool = False
    command: str = "afm-eval"
    """The command line, recorded in the report."""


def _noise_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--noise-opt {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def _seeds(text: str) -> int | list[int]:
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise EvalInputError(f"--seeds {text!r}: expected a count or a list of ints") from None


def _ns(req: EvalRequest) -> list[int]:
    try:
        if req.ns:
            return check_ns([int(x) for x in req.ns.split(",") if x.strip()])
        return default_ns(req.max_n)
    except ValueError as err:
        raise EvalInputError(f"--ns/--max-n: {err}") from None


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise EvalInputError(f"--limit must be > 0, got {value:g}")
    return int(value) if value >= 1 else value


def _task_specs(req: EvalRequest) -> tuple[list[TaskSpec], dict[str, Any]]:
    if req.suite and req.tasks:
        raise EvalInputError("give --tasks or --suite, not both")
    if req.suite:
        specs, suite_meta = load_suite(req.suite)
    elif req.tasks:
        specs, suite_meta = parse_tasks(req.tasks), {}
    else:
        raise EvalInputError("no tasks: give --tasks or --suite")
    if req.num_fewshot is not None:
        specs = [
            s if s.num_fewshot is not None else TaskSpec(s.task, req.num_fewshot, s.metric, s.limit)
            for s in specs
        ]
    return specs, suite_meta


def _drift_times(req: EvalRequest) -> list[str] | None:
    if not req.drift_times:
        return None
    if req.drift_times.strip() == "all":
        return list(DRIFT_TIMES)
    return [t.strip() for t in req.drift_times.split(",") if t.strip()]


def _conditions(req: EvalRequest) -> list[Condition]:
    noise_opts = _noise_options(req.noise_opt)
    seeds = _seeds(req.seeds)
    drift = _drift_times(req)
    if req.sweep:
        if drift:
            raise EvalInputError("--sweep and --drift-times cannot be combined")
        conds = sweep_conditions(req.sweep, noise=req.noise, noise_options=noise_opts, seeds=seeds)
        if not req.no_fp:
            conds = [Condition("fp")] + conds
    else:
        conds = make_conditions(req.noise, seeds, drift, noise_opts, not req.no_fp)
    if not conds:
        raise EvalInputError("nothing to evaluate (--no-fp without --noise)")
    return conds


def _run_ttc(req, models, specs, conds, limit, meta, progress) -> EvalReport:  # noqa: ANN001
    if len(specs) != 1:
        raise EvalInputError("--ttc takes exactly one task")
    task = specs[0].task
    if req.fast or task == "toyworld_arith":
        source: Any = ToyArithSource(limit=int(limit) if limit else None, spread=req.spread)
    else:
        source = LmEvalSource(
            task,
            num_fewshot=specs[0].num_fewshot,
            limit=limit,
            include_path=req.include_path,
            metric=specs[0].metric,
        )
    return run_ttc(
        models,
        source,
        _ns(req),
        conditions=conds,
        scorers=req.scorer or ["verifier"],
        temperature=req.temperature,
        top_p=req.top_p,
        max_new_tokens=req.max_new_tokens,
        n_subsets=req.n_subsets,
        sample_seed=req.sample_seed,
        batch_size=req.sample_batch,
        device=req.device,
        title=req.title or f"test-time compute: {task}",
        meta=meta,
        progress=progress,
    )


def _check_name(name: str | None) -> None:
    """``--name`` is a file stem inside ``--out``: no directories, no way out of it."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise EvalInputError(
            f"--name {name!r} is invalid: a file name without directories (the files go to --out)"
        )


def _check_numbers(req: EvalRequest) -> None:
    """The numeric flags, before anything is loaded (one line naming the flag)."""
    for flag, value in (
        ("--threads", req.threads),
        ("--batch-size", req.batch_size),
        ("--max-new-tokens", req.max_new_tokens),
        ("--n-subsets", req.n_subsets),
        ("--sample-batch", req.sample_batch),
    ):
        if value is not None and value < 1:
            raise EvalInputError(f"{flag} must be >= 1, got {value}")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise EvalInputError(f"--temperature must be a finite number >= 0, got {req.temperature}")
    if not (0 < req.top_p <= 1):
        raise EvalInputError(f"--top-p must be in (0, 1], got {req.top_p}")
    if req.num_fewshot is not None and req.num_fewshot < 0:
        raise EvalInputError(f"--num-fewshot must be >= 0, got {req.num_fewshot}")


def run_eval_request(req: EvalRequest) -> tuple[EvalReport, dict[str, Path]]:
    """Validate the request, evaluate, write ``<out>/<name>.md|.json|.png``; returns the
    report and the written paths.  Bad input raises :class:`EvalInputError` (or a
    ``ValueError`` naming the flag) before any model is loaded."""
    progress = not req.quiet
    _check_numbers(req)
    check_device("", "--device", req.device)
    check_output_path("--out", req.out)
    _check_name(req.name)
    if req.threads is not None:
        import torch

        torch.set_num_threads(req.threads)
    models = [ModelSpec.parse(m) for m in req.models]
    for m in models:
        check_model_spec(m)
    specs, suite_meta = _task_specs(req)
    limit = _limit(req.limit)
    conds = _conditions(req)
    if req.ttc:
        _ns(req)  # checked before anything is loaded
    meta: dict[str, Any] = {
        "command": req.command,
        "models": [m.__dict__ for m in models],
        "tasks": [s.__dict__ for s in specs],
        "limit": limit,
        **({"suite": suite_meta} if suite_meta else {}),
    }
    if req.ttc:
        report = _run_ttc(req, models, specs, conds, limit, meta, progress)
        stem = req.name or "ttc"
    else:
        if req.fast:
            runner: Any = ToyRunner(
                [s.task for s in specs], limit=int(limit) if limit else None, spread=req.spread
            )
        else:
            runner = LmEvalRunner(
                specs,
                include_path=req.include_path,
                limit=limit,
                spread=req.spread,
                batch_size=req.batch_size,
            )
        if req.sweep:
            stem, layout = req.name or "sweep", "conditions"
        else:
            stem, layout = req.name or ("drift" if _drift_times(req) else "eval"), "tasks"
        report = run_evaluation(
            models,
            runner,
            conds,
            device=req.device,
            title=req.title or stem,
            meta=meta,
            progress=progress,
        )
        report.layout = layout
    return report, report.write(req.out, stem)
