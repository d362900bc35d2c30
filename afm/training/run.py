"""An ``afm-train`` run end to end: data, distillation, the saved model, the report.

:func:`run_training` takes a resolved :class:`~afm.training.run_config.RunConfig` and

1. checks everything it will read or write (:mod:`afm.training.preflight`) before it
   writes anything: a failed start leaves no trace;
2. locks the output directory (a second run on it is refused; a stale lock of a
   killed run is taken over) and writes ``run_config.json`` / ``.yaml`` atomically;
3. samples the synthetic corpus into ``<output>/data`` (resumable) from the digital
   teacher, with the sparse teacher targets of ``data.targets``, and/or packs the
   user's corpus (``corpus.*``) into ``<output>/corpus``;
4. distils the analog student (``afm.training.distill``: checkpoints, exact resume from
   the newest intact one): from the cached targets when the training rows hold them
   (the loaded model is converted into the student, no teacher copy), else from the
   live teacher;
5. saves it with its tokenizer (loads with ``from_pretrained`` after ``import afm``);
6. for models with bundled tasks (``tiny``) prints the before/after table under noise.

Rerunning a finished run does nothing, unless its evaluation settings (``eval.*``)
changed: then the saved student is evaluated again and the new table replaces the old.
A raised ``train.max_steps`` extends a finished run from its last checkpoint.
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

from afm.analog.layers import analog_layers
from afm.analog.select import output_head_names
from afm.models import load_model, resolve_model
from afm.training.batches import BatchOrder
from afm.training.corpus import load_corpus, mix_rows, prepare_corpus
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
from afm.training.progress import resolve_progress
from afm.training.report import before_after, format_table, has_bundled_tasks
from afm.training.run_config import RunConfig
from afm.training.shards import load_synthetic_data
from afm.training.teacher_targets import resolve_target_form, stored_forms, tokens_only

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


def _corpus(cfg: RunConfig, acc: Any, tokenizer: Any) -> Any:
    """The packed rows of the user's corpus (packed once, on the main process)."""
    if acc.is_main_process:
        prepare_corpus(
            cfg.corpus,
            tokenizer,
            cfg.corpus_dir,
            seq_len=cfg.data.seq_len,
            tokenizer_name=cfg.model,
        )
    acc.wait_for_everyone()
    return load_corpus(cfg.corpus_dir)


def _data(
    cfg: RunConfig, acc: Any, teacher: Any, tokenizer: Any, resuming: bool, progress: bool | str
):
    corpus = _corpus(cfg, acc, tokenizer) if cfg.corpus.enabled else None
    if not cfg.uses_synthetic_data:
        return corpus
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
            progress=resolve_progress(progress) == "bar" and acc.is_local_main_process,
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
    dataset = load_synthetic_data(data_dir)
    if corpus is None:
        return dataset
    if stored_forms(dataset):
        # The corpus rows have no teacher targets: a mixture trains with the live teacher.
        logger.warning(
            "corpus.mix=%s: the corpus rows hold no cached teacher targets, so the mixture "
            "is distilled from the live teacher (the generated rows' %s targets are unused; "
            "data.targets=none skips computing them)",
            cfg.corpus.mix,
            "/".join(stored_forms(dataset)),
        )
        dataset = tokens_only(dataset)
    return mix_rows(corpus, dataset, cfg.corpus.mix)


def _evaluate(cfg: RunConfig, teacher, student, tokenizer, dataset, pad_id: int):  # noqa: ANN001
    """The before/after table on the bundled tasks (None for models without them)."""
    if not has_bundled_tasks(resolve_model(cfg.model)):
        logger.warning("%s has no bundled tasks; skipping the before/after table", cfg.model)
        return None, None
    logger.info("evaluating teacher and student on the bundled tasks")
    order = BatchOrder(dataset, cfg.train.per_device_batch_size, 1, 1, cfg.train.seed)
    calib = [order.collate(i, pad_id) for i in order.calibration(cfg.eval.calibration_batches)]
    placement = cfg.student_placement()
    evaluation = before_after(
        teacher,
        student,
        tokenizer,
        calib,
        preset=cfg.eval_chip(),
        chip_name=cfg.eval_chip_name,
        analog_head=bool(set(analog_layers(student)) & output_head_names(student)),
        layers=placement.modules if placement is not None else None,
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
    if teacher is None:  # trained from cached targets: the table compares with the FP teacher
        teacher, _ = load_teacher(cfg)
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
        if cfg.uses_synthetic_data:
            dataset = load_synthetic_data(cfg.resolved_data_dir)
        else:
            dataset = load_corpus(cfg.corpus_dir)
        table = _write_evaluation(cfg, teacher, student, tokenizer, dataset)
        summary = {**summary, "table": table}
        _write_config(cfg)
        write_json_atomic(out / SUMMARY, summary)
    acc.wait_for_everyone()
    return RunOutcome(out, summary, True, acc.is_main_process, reevaluated=True)


def _train(
    cfg: RunConfig, acc: Any, teacher, tokenizer, resuming: bool, progress: bool | str, t_start
):  # noqa: ANN001
    out = Path(cfg.output)
    teacher.to(acc.device)
    dataset = _data(cfg, acc, teacher, tokenizer, resuming, progress)
    cached = resolve_target_form(dataset, cfg.train.kd_targets)
    # Cached targets: the loaded model becomes the student, no teacher copy is kept.
    placement = cfg.student_placement()
    if placement is not None:  # the placement lists the output head or not
        student = make_student(teacher, placement, copy_teacher=cached is None)
    else:
        student = make_student(
            teacher,
            cfg.student_chip(),
            copy_teacher=cached is None,
            convert_lm_head=cfg.head_is_analog(),
        )
    logger.info("distilling the teacher into an analog student (chip %s)", cfg.eval_chip_name)
    if cached is not None:
        logger.info("training on the cached %r teacher targets: no live teacher", cached)
        teacher = None
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


def run_training(cfg: RunConfig, *, progress: bool | str = True) -> RunOutcome:
    """Run (or resume, or extend) the ``afm-train`` pipeline of ``cfg`` (module docstring).

    ``progress``: ``"auto"`` (True: a bar on a TTY, a log line every
    ``train.logging_steps`` elsewhere), ``"bar"``, ``"log"`` or ``"none"`` (False)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start, out = time.perf_counter(), Path(cfg.output)
    check_output_dir(cfg)
    summary = finished_summary(cfg)
    if summary is not None and _nothing_to_do(cfg):
        return _finished(cfg, summary)
    acc = make_accelerator(cfg.train, out / "trackers")
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
