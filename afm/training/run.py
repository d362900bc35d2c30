"""An ``afm-train`` run end to end: data, distillation, the saved model, the report.

:func:`run_training` takes a resolved :class:`~afm.training.run_config.RunConfig` and

1. refuses an output directory that holds another run (a rerun of the same one resumes;
   one with a raised ``train.max_steps`` extends it from its last checkpoint);
2. loads the FP teacher, samples the synthetic corpus into ``<output>/data`` (resumable),
   with the sparse teacher targets of ``data.targets``, and/or packs the user's corpus
   (``corpus.*``) into ``<output>/corpus``;
3. distils the analog student (``afm.training.distill``, checkpoints, exact resume): from
   the cached targets when the training rows hold them (the loaded model is converted
   into the student, no teacher copy), else from the live teacher;
4. saves it with its tokenizer (loads with ``from_pretrained`` after ``import afm``);
5. for models with bundled tasks (``tiny``) prints the before/after table under noise.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from afm.analog.layers import analog_layers
from afm.analog.select import output_head_names
from afm.models import load_model, load_tokenizer, resolve_model
from afm.training.batches import BatchOrder
from afm.training.corpus import check_corpus, load_corpus, mix_rows, prepare_corpus
from afm.training.data import DataError, generate_synthetic_data
from afm.training.distill import DistillResult, distill, make_student, save_student
from afm.training.engines import make_accelerator
from afm.training.progress import resolve_progress
from afm.training.report import before_after, format_table, has_bundled_tasks
from afm.training.run_config import ConfigError, RunConfig
from afm.training.shards import load_synthetic_data
from afm.training.teacher_targets import resolve_target_form, stored_forms, tokens_only

__all__ = ["RunOutcome", "check_output_dir", "run_training"]

logger = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What :func:`run_training` did (``summary`` is ``train_summary.json``)."""

    output: Path
    summary: dict[str, Any]
    already_finished: bool = False
    main_process: bool = True
    """False on the other ranks of a distributed run (they report nothing)."""


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _check_max_steps(old: dict[str, Any], cfg: RunConfig, out: Path) -> None:
    """``train.max_steps`` may be raised (the run is extended), never lowered."""
    before = (old.get("train") or {}).get("max_steps")
    now = cfg.train.max_steps
    if before == now:
        return
    if before is None or now is None or now < before:
        raise ConfigError(
            f"output directory {str(out)!r} holds a run with train.max_steps={before}; "
            f"train.max_steps={now} can only raise it (extend the run) — choose another "
            "--output for a different run"
        )


def check_output_dir(cfg: RunConfig) -> bool:
    """Raise if ``cfg.output`` holds another run; True if it holds this one (resume)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    saved = out / "run_config.json"
    if not saved.exists():
        raise ConfigError(
            f"output directory {str(out)!r} is not empty and holds no afm-train run; "
            "choose another --output"
        )
    try:
        old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{str(saved)!r} is unreadable; choose another --output") from None
    ident_new = json.loads(json.dumps(cfg.identity()))
    ident_old = {k: v for k, v in old.items() if k in ident_new}
    ident_old.setdefault("corpus", ident_new["corpus"] if not cfg.corpus.enabled else None)
    for sec in ("train", "data", "corpus"):
        if isinstance(ident_old.get(sec), dict):
            ident_old[sec] = {k: v for k, v in ident_old[sec].items() if k in ident_new[sec]}
    diff = _diff_keys(ident_old, ident_new)
    if diff:
        raise ConfigError(
            f"output directory {str(out)!r} holds a different run (differs in "
            f"{', '.join(diff[:5])}); choose another --output or delete it"
        )
    _check_max_steps(old, cfg, out)
    return True


def _finished(out: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run that ``cfg`` does not extend, else None."""
    path = out / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if cfg.train.max_steps is not None and summary.get("steps", 0) < cfg.train.max_steps:
        logger.info(
            "extending the finished run from %s to %d steps",
            summary.get("steps"),
            cfg.train.max_steps,
        )
        return None
    return summary


def _write_config(cfg: RunConfig) -> None:
    import yaml

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    (out / "run_config.json").write_text(json.dumps(d, indent=2))
    (out / "run_config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def _pad_id(tokenizer: Any) -> int:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad_id


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
    if len(dataset) == 0:
        raise DataError(f"data directory {str(data_dir)!r} is empty")
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


def run_training(cfg: RunConfig, *, progress: bool | str = True) -> RunOutcome:
    """Run (or resume, or extend) the ``afm-train`` pipeline of ``cfg`` (module docstring).

    ``progress``: ``"auto"`` (True: a bar on a TTY, a log line every
    ``train.logging_steps`` elsewhere), ``"bar"``, ``"log"`` or ``"none"`` (False)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    resuming = check_output_dir(cfg)
    out = Path(cfg.output)
    summary = _finished(out, cfg)
    if summary is not None:
        return RunOutcome(out, summary, already_finished=True)
    if cfg.uses_synthetic_data and not cfg.generate:
        load_synthetic_data(cfg.resolved_data_dir)  # DataError when missing / incomplete
    tokenizer = load_tokenizer(cfg.model)
    if cfg.corpus.enabled:
        check_corpus(cfg.corpus, tokenizer)  # a bad path or column fails before any write
        if cfg.train.kd_targets not in ("auto", "live"):
            raise DataError(
                f"train.kd_targets={cfg.train.kd_targets!r} with corpus.path: corpus rows hold "
                "no cached teacher targets; use train.kd_targets=auto or live"
            )
    acc = make_accelerator(cfg.train, out / "trackers")
    teacher = load_model(cfg.model, dtype=torch.float32)
    pad_id = _pad_id(tokenizer)
    if acc.is_main_process:
        _write_config(cfg)
    acc.wait_for_everyone()
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
    if cached is not None:
        logger.info("training on the cached %r teacher targets: no live teacher", cached)
        teacher = None
    result = distill(
        teacher,
        student,
        dataset,
        cfg.train,
        out,
        pad_id=pad_id,
        accelerator=acc,
        resume=True,
        progress=progress,
    )
    student = result.model  # whole on the main process, also under FSDP / ZeRO-3
    if acc.is_main_process:
        save_student(student, out)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    train_s = time.perf_counter() - t_start
    table = None
    if acc.is_main_process and cfg.eval.enabled:
        if teacher is None:  # the before/after table compares with the FP teacher
            teacher = load_model(cfg.model, dtype=torch.float32).to(acc.device)
        evaluation, table = _evaluate(cfg, teacher, student, tokenizer, dataset, pad_id)
        if evaluation is not None:
            (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
    summary = _summary(result, t_start, train_s, table)
    if acc.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    return RunOutcome(out, summary, main_process=acc.is_main_process)
