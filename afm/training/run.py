"""An ``afm-train`` run end to end: data, distillation, the saved model, the report.

:func:`run_training` takes a resolved :class:`~afm.training.run_config.RunConfig` and

1. checks everything it will read or write (:mod:`afm.training.preflight`) before it
   writes anything: a failed start leaves no trace;
2. locks the output directory (a second run on it is refused; a stale lock of a
   killed run is taken over) and writes ``run_config.json`` / ``.yaml`` atomically;
3. samples the synthetic corpus into ``<output>/data`` (resumable) from the digital
   teacher;
4. distils the analog student (``afm.training.distill``: checkpoints, exact resume from
   the newest intact one);
5. saves it with its tokenizer (loads with ``from_pretrained`` after ``import afm``);
6. for models with bundled tasks (``tiny``) prints the before/after table under noise.

Rerunning a finished run does nothing, unless its evaluation settings (``eval.*``)
changed: then the saved student is evaluated again and the new table replaces the old.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from afm.models import load_model, resolve_model
from afm.training.batches import BatchOrder
from afm.training.data import generate_synthetic_data
from afm.training.distill import DistillResult, distill, make_student, save_student
from afm.training.engines import make_accelerator
from afm.training.files import (
    OutputInUseError,
    RunLock,
    remove_orphans,
    write_json_atomic,
    write_text_atomic,
)
from afm.training.preflight import (
    SUMMARY,
    check_inputs,
    check_output_dir,
    finished_summary,
    load_teacher,
    pad_id_of,
    same_evaluation,
)
from afm.training.report import before_after, format_table, has_bundled_tasks
from afm.training.run_config import RunConfig
from afm.training.shards import load_synthetic_data

__all__ = ["RunOutcome", "run_training"]

logger = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What :func:`run_training` did (``summary`` is ``train_summary.json``)."""

    output: Path
    summary: dict[str, Any]
    already_finished: bool = False
    main_process: bool = True
    """False on the other ranks of a distributed run (they report nothing)."""
    reevaluated: bool = False
    """A finished run evaluated again because its ``eval.*`` settings changed."""


@contextlib.contextmanager
def _locked(acc: Any, out: Path) -> Iterator[None]:
    """The output directory's lock, taken by the main process for all ranks."""
    lock = RunLock(out, "afm-train") if acc.is_main_process else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except OutputInUseError as err:
            error = str(err)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise OutputInUseError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _write_config(cfg: RunConfig) -> None:
    import yaml

    out = Path(cfg.output)
    d = cfg.to_dict()
    write_json_atomic(out / "run_config.json", d)
    write_text_atomic(out / "run_config.yaml", yaml.safe_dump(d, sort_keys=False))


def _data(cfg: RunConfig, acc: Any, teacher: Any, tokenizer: Any, resuming: bool, progress: bool):
    data_dir = cfg.resolved_data_dir
    if cfg.generate:
        logger.info("sampling synthetic data into %s", data_dir)
        stats = generate_synthetic_data(
            teacher,
            tokenizer,
            data_dir,
            cfg.data,
            model_name=cfg.model,
            rank=acc.process_index,
            world_size=acc.num_processes,
            progress=progress and acc.is_local_main_process,
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            logger.info(
                "synthetic data %s: %d tokens in %d sequences (generated %d shards%s)",
                data_dir,
                stats["tokens"],
                stats["sequences"],
                stats["generated"],
                ", resumed" if resuming else "",
            )
    return load_synthetic_data(data_dir)


def _evaluate(cfg: RunConfig, teacher, student, tokenizer, dataset, pad_id: int):  # noqa: ANN001
    """The before/after table on the bundled tasks (None for models without them)."""
    if not has_bundled_tasks(resolve_model(cfg.model)):
        logger.warning("%s has no bundled tasks; skipping the before/after table", cfg.model)
        return None, None
    logger.info("evaluating teacher and student on the bundled tasks")
    order = BatchOrder(dataset, cfg.train.per_device_batch_size, 1, 1, cfg.train.seed)
    calib = [order.collate(i, pad_id) for i in order.calibration(cfg.eval.calibration_batches)]
    evaluation = before_after(
        teacher,
        student,
        tokenizer,
        calib,
        preset=cfg.eval_chip(),
        chip_name=cfg.eval_chip_name,
        analog_head=cfg.head_is_analog(),
        noise=cfg.eval_noise(),
        seeds=cfg.eval.seeds,
        n_per_kind=cfg.eval.n_per_kind,
        facts=cfg.eval.facts,
        curve_scales=cfg.eval.curve_scales,
    )
    return evaluation, format_table(evaluation)


def _write_evaluation(cfg: RunConfig, teacher, student, tokenizer, dataset) -> str | None:  # noqa: ANN001
    """Evaluate (main process), write ``eval.json``; the table, or None without tasks."""
    if not cfg.eval.enabled:
        return None
    evaluation, table = _evaluate(cfg, teacher, student, tokenizer, dataset, pad_id_of(tokenizer))
    if evaluation is not None:
        write_json_atomic(Path(cfg.output) / "eval.json", evaluation)
    return table


def _summary(result: DistillResult, t_start: float, train_s: float, table: str | None) -> dict:
    return {
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.final_loss,
        "seconds_to_trained": round(train_s, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "table": table,
    }


def _reevaluate(cfg: RunConfig, acc: Any, teacher, tokenizer, summary: dict) -> RunOutcome:  # noqa: ANN001
    """Evaluate a finished run's saved student with the new ``eval.*`` settings."""
    out = Path(cfg.output)
    if acc.is_main_process:
        logger.info("%s holds a finished run; evaluating it with the new eval settings", out)
        student = load_model(out, dtype=torch.float32)
        dataset = load_synthetic_data(cfg.resolved_data_dir)
        table = _write_evaluation(cfg, teacher, student, tokenizer, dataset)
        summary = {**summary, "table": table}
        _write_config(cfg)
        write_json_atomic(out / SUMMARY, summary)
    acc.wait_for_everyone()
    return RunOutcome(out, summary, True, acc.is_main_process, reevaluated=True)


def _train(cfg: RunConfig, acc: Any, teacher, tokenizer, resuming: bool, progress: bool, t_start):  # noqa: ANN001
    out = Path(cfg.output)
    teacher.to(acc.device)
    dataset = _data(cfg, acc, teacher, tokenizer, resuming, progress)
    student = make_student(teacher, cfg.student_chip(), convert_lm_head=cfg.head_is_analog())
    logger.info("distilling the teacher into an analog student (chip %s)", cfg.eval_chip_name)
    result = distill(
        teacher,
        student,
        dataset,
        cfg.train,
        out,
        pad_id=pad_id_of(tokenizer),
        accelerator=acc,
        resume=True,
        progress=progress,
    )
    student = result.model  # whole on the main process, also under FSDP / ZeRO-3
    if acc.is_main_process:
        logger.info("saving the analog model to %s", out)
        save_student(student, out)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    train_s = time.perf_counter() - t_start
    table = None
    if acc.is_main_process:
        table = _write_evaluation(cfg, teacher, student, tokenizer, dataset)
    summary = _summary(result, t_start, train_s, table)
    if acc.is_main_process:
        write_json_atomic(out / SUMMARY, summary)
    acc.wait_for_everyone()
    return RunOutcome(out, summary, main_process=acc.is_main_process)


def _nothing_to_do(cfg: RunConfig) -> bool:
    """A finished run needs no evaluation: the same ``eval.*`` settings, or none asked."""
    return not cfg.eval.enabled or same_evaluation(cfg)


def _finished(cfg: RunConfig, summary: dict[str, Any]) -> RunOutcome:
    if not cfg.eval.enabled:  # no table was asked for: do not show the old one
        summary = {**summary, "table": None}
    return RunOutcome(Path(cfg.output), summary, already_finished=True)


def run_training(cfg: RunConfig, *, progress: bool = True) -> RunOutcome:
    """Run (or resume) the ``afm-train`` pipeline of ``cfg`` (module docstring)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start, out = time.perf_counter(), Path(cfg.output)
    check_output_dir(cfg)
    summary = finished_summary(cfg)
    if summary is not None and _nothing_to_do(cfg):
        return _finished(cfg, summary)
    acc = make_accelerator(cfg.train)
    teacher, tokenizer = load_teacher(cfg)
    if summary is None:
        check_inputs(cfg, acc.num_processes, teacher, tokenizer)
    with _locked(acc, out):
        resuming = check_output_dir(cfg)  # again: another run may have started meanwhile
        summary = finished_summary(cfg)
        if summary is not None:
            if _nothing_to_do(cfg):
                return _finished(cfg, summary)
            return _reevaluate(cfg, acc, teacher, tokenizer, summary)
        if acc.is_main_process:
            remove_orphans(out, (".run_config.", f".{SUMMARY}.", ".eval.json."))
            _write_config(cfg)
        acc.wait_for_everyone()
        return _train(cfg, acc, teacher, tokenizer, resuming, progress, t_start)
