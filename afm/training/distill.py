"""Distillation of an analog student from its FP teacher (the AFM recipe), on accelerate.

    student = make_student(teacher, "afm-paper")
    result = distill(teacher, student, dataset, DistillConfig(...), "runs/x")

The loop is written on ``accelerate`` directly (not the HF Trainer) so that it
controls what the analog recipe needs: an input-range calibration pass before
any engine wraps the model, weight clipping on the parameters the optimizer
really updates (the fp32 master weights, :mod:`afm.training.engines`), skipping of
non-finite steps on all ranks at once (:mod:`afm.training.step`), and checkpoints
that resume the exact trajectory (weights, optimizer, scheduler, per-rank RNG and
data position; safetensors + JSON, no pickles: :mod:`afm.training.checkpoint`).
``accelerate launch`` with the configs in ``configs/accelerate`` runs it on one GPU,
DDP, FSDP or DeepSpeed ZeRO-2.

FSDP and ZeRO-3 shard the student's parameters in place, and DeepSpeed keeps the
fp32 masters apart from the module's (fp16) parameters, so under those engines the
module passed in is not the trained student: :class:`DistillResult` ``.model`` is,
rebuilt on the main process from the fp32 masters — save that one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.calibration import calibrate_input_ranges_
from afm.analog.convert import convert
from afm.analog.hf import AfmQuantizationConfig, attach_quantization_config
from afm.analog.layers import analog_layers
from afm.config import AnalogConfig
from afm.presets import analog_head_of, get_preset
from afm.training.batches import BatchOrder
from afm.training.checkpoint import (
    CKPT_PREFIX,
    load_checkpoint,
    newest_intact,
    prune_checkpoints,
    remove_unfinished,
    save_checkpoint,
)
from afm.training.data_checks import check_token_ids
from afm.training.distill_config import NOT_IN_FINGERPRINT, TEACHER_DTYPES, DistillConfig
from afm.training.engines import (
    clip_after_step,
    describe,
    full_parameters,
    make_accelerator,
    needs_gathered_copy,
    rebuild,
    skeleton,
)
from afm.training.guard import TrainingStopped, UpdateGuard, check_finite
from afm.training.progress import TrainLog, resolve_progress
from afm.training.step import SKIP_REASONS, Stepper
from afm.training.teacher_targets import CachedTargets, resolve_target_form, tokens_only
from afm.validation import check_device

logger = logging.getLogger(__name__)

__all__ = [
    "DistillResult",
    "distill",
    "make_student",
    "param_groups",
    "save_student",
]


@dataclass
class DistillResult:
    steps: int
    skipped_steps: int
    resumed_from: int | None
    final_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)
    # The trained student, whole and in fp32: the module passed in (single device, DDP),
    # or under FSDP / DeepSpeed a copy rebuilt on the main process from the gathered fp32
    # master weights (``None`` on the other ranks).
    model: nn.Module | None = None


# --------------------------------------------------------------------------- model set-up


def make_student(
    teacher: nn.Module,
    preset: str | AnalogConfig | AfmQuantizationConfig = "afm-paper",
    *,
    copy_teacher: bool = True,
    **convert_kwargs: Any,
) -> nn.Module:
    """A deep copy of ``teacher`` with its linear layers converted.

    The output head follows the preset's head policy when ``preset`` is a name
    (``afm.presets.analog_head_of``: analog for afm-paper, tiny-stress, ahwa-lora),
    else ``afm.convert``'s default (digital); ``convert_lm_head=`` overrides either.
    An ``AfmQuantizationConfig`` (a placement) converts exactly the layers it lists.
    ``copy_teacher=False`` converts ``teacher`` itself (training from cached targets
    needs no teacher afterwards, so it never holds two copies).
    """
    if isinstance(preset, str):
        convert_kwargs.setdefault("convert_lm_head", analog_head_of(preset))
    config = get_preset(preset) if isinstance(preset, str) else preset
    student = copy.deepcopy(teacher) if copy_teacher else teacher
    for p in student.parameters():
        p.requires_grad_(True)
    convert(student, config, **convert_kwargs)
    for layer in analog_layers(student).values():
        layer.set_config(layer.analog_config)  # input-range gradients per the chip (experts too)
    student.train()
    return student


def _freeze_teacher(teacher: nn.Module, cfg: DistillConfig, device: torch.device) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.teacher_dtype is not None:
        teacher.to(TEACHER_DTYPES[cfg.teacher_dtype])
    teacher.to(torch.device(cfg.teacher_device) if cfg.teacher_device else device)
    return teacher


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices; none on biases, norms and ``input_range``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("input_range") or p.ndim < 2 or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _prepare_student(student: nn.Module, cfg: DistillConfig, device: torch.device) -> None:
    student.to(device)
    student.train()
    if getattr(student, "config", None) is not None:
        student.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing restores the RNG for the recompute, so the
        # analog noise of the recomputed forward is the noise of the original one.
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x
            student.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )


def _calibrate(
    student: nn.Module, order: BatchOrder, cfg: DistillConfig, pad_id: int, progress: bool
) -> None:
    n_cal = cfg.calibration_batches
    if n_cal is None:
        n_cal = max(
            (la.analog_config.input.init_steps for la in analog_layers(student).values()),
            default=0,
        )
    if n_cal > 0:
        calibrate_input_ranges_(
            student,
            (order.collate(i, pad_id) for i in order.calibration(n_cal)),
            max_steps=n_cal,
            progress=progress,
        )


def _optimizer_and_schedule(student: nn.Module, cfg: DistillConfig, world: int, total: int):
    from transformers import get_polynomial_decay_schedule_with_warmup

    lr = cfg.lr * (world if cfg.scale_lr_by_world_size else 1)
    optimizer = torch.optim.AdamW(
        param_groups(student, cfg.weight_decay),
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(round(cfg.warmup_ratio * total)),
        num_training_steps=total,
        lr_end=cfg.lr_end,
        power=cfg.lr_power,
    )
    return optimizer, scheduler


def _same_settings(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Fingerprints equal up to the keys a resumed run may change (checkpoints written
    before a key moved to ``NOT_IN_FINGERPRINT`` still carry it)."""

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in NOT_IN_FINGERPRINT}

    return strip(saved) == strip(current)


def _resume(acc: Any, model, optimizer, scheduler, ckpt: Path, fingerprint, total: int):  # noqa: ANN001
    """Load ``ckpt``; a raised ``max_steps`` continues on the new total's schedule."""
    state = load_checkpoint(acc, model, optimizer, scheduler, ckpt)
    if not _same_settings(state["fingerprint"], fingerprint):
        raise RuntimeError(
            f"checkpoint {ckpt} belongs to a run with different settings; "
            "use another output directory"
        )
    if state["step"] > total:
        raise ValueError(
            f"train.max_steps={total} is below the checkpoint's step {state['step']} "
            f"({ckpt}): a run can be extended, not shortened"
        )
    if state.get("total_steps", total) != total:
        # The lambdas of the schedule are rebuilt for the new total; the optimizer still
        # holds the old schedule's lr for this step: put the new schedule's there too.
        inner = getattr(optimizer, "optimizer", optimizer)
        lrs = [
            base * lam(state["step"])
            for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(inner.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs  # noqa: SLF001 - what get_last_lr() reports
        logger.info(
            "extending the run from %d to %d steps: lr schedule of the new total, at step %d",
            state["total_steps"],
            total,
            state["step"],
        )
    return state


def _finished_student(acc: Any, model: nn.Module, shell: nn.Module | None, cfg: DistillConfig):
    """The whole trained student (main process), in eval mode."""
    acc.wait_for_everyone()
    if shell is not None:
        full = full_parameters(acc, model)  # collective: every rank takes part
        trained = rebuild(shell, full) if acc.is_main_process else None
    else:
        trained = acc.unwrap_model(model)
    if trained is not None:
        if cfg.gradient_checkpointing:
            disable = getattr(trained, "activation_checkpointing_disable", None) or (
                trained.gradient_checkpointing_disable
            )
            disable()
        trained.eval()
    return trained


def _cached_targets(dataset: Any, cfg: DistillConfig, teacher: nn.Module | None):
    """The cached targets ``train.kd_targets`` picks for ``dataset`` (None: live teacher)."""
    form = resolve_target_form(dataset, cfg.kd_targets)
    if form is None:
        if teacher is None:
            raise ValueError(
                f"train.kd_targets={cfg.kd_targets!r}: the data holds no cached teacher "
                "targets, so distillation needs the live teacher (teacher=None given)"
            )
        return None
    if cfg.temperature != 1.0:
        raise ValueError(
            f"train.temperature={cfg.temperature!r} is invalid with cached {form!r} targets: "
            "they hold the teacher's T = 1 distribution (set train.kd_targets=live)"
        )
    return CachedTargets(dataset, form)


def _rollback(acc: Any, cfg: DistillConfig) -> bool:
    """Whether the trainer keeps a copy to undo a non-finite update (``nonfinite_guard``)."""
    from accelerate.utils import DistributedType

    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if cfg.nonfinite_guard == "rollback" and deepspeed:
        raise ValueError(
            "train.nonfinite_guard='rollback' is not available under DeepSpeed (its "
            "optimizer owns the fp32 masters); use 'stop' or 'auto'"
        )
    return cfg.nonfinite_guard == "rollback" or (cfg.nonfinite_guard == "auto" and not deepspeed)


def _update_guard(acc: Any, model: nn.Module, optimizer: Any, cfg: DistillConfig) -> UpdateGuard:
    names = {id(p): n for n, p in acc.unwrap_model(model).named_parameters()}
    return UpdateGuard(optimizer, names, rollback=_rollback(acc, cfg))


def _stopped(log: TrainLog, step: int, ckpt: Path | None) -> TrainingStopped:
    first = step + 2 - log.consecutive
    since = f"checkpoint {ckpt.name}" if ckpt is not None else "the start"
    return TrainingStopped(
        f"{log.consecutive} steps in a row were skipped (steps {first}-{step + 1}, the "
        f"last for {SKIP_REASONS.get(log.last_reason or '', 'non-finite values')}): the run "
        f"diverged or its data is broken; training stopped, nothing saved after {since}. "
        "Lower train.lr, check the data, or raise train.max_consecutive_skips"
    )


# --------------------------------------------------------------------------- training


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    dataset: Any,
    config: DistillConfig,
    output_dir: str | Path,
    *,
    pad_id: int = 0,
    accelerator: Any = None,
    resume: bool = True,
    max_steps_this_run: int | None = None,
    progress: bool | str = True,
) -> DistillResult:
    """Distil ``teacher`` into the analog ``student`` on ``dataset`` (rows of ``input_ids``).

    Checkpoints go to ``output_dir/checkpoints``; with ``resume`` the latest one is
    loaded first (same config and dataset size required) and the run continues the
    same trajectory; a raised ``config.max_steps`` extends a finished run from its last
    checkpoint on the schedule of the new total.  ``max_steps_this_run`` stops early
    (time-sliced jobs, tests).  ``progress``: ``"auto"`` (True; a bar on a TTY, else a
    log line every ``logging_steps``), ``"bar"``, ``"log"`` or ``"none"`` (False).
    The student is trained in place (single device, DDP); under FSDP / DeepSpeed use
    ``result.model``, the whole fp32 student gathered onto the main process.  Either
    way ``result.model`` is the one to save with :func:`save_student`.

    When ``dataset`` holds cached sparse teacher targets (``data.targets``) and
    ``train.kd_targets`` picks them, the teacher is not used: pass ``teacher=None``.
    """
    cfg = config
    if not analog_layers(student):
        raise ValueError("the student has no AnalogLinear layers: use make_student / afm.convert")
    check_device("train", "teacher_device", cfg.teacher_device)
    targets = _cached_targets(dataset, cfg, teacher)
    dataset = tokens_only(dataset)
    acc = (
        accelerator
        if accelerator is not None
        else make_accelerator(cfg, Path(output_dir) / "trackers")
    )
    if cfg.report_to and not acc.log_with:
        raise ValueError(
            "train.report_to is set but the accelerator has no trackers: make it with "
            "afm.training.engines.make_accelerator(config, project_dir)"
        )
    if acc.is_main_process:
        logger.info("distilling on %s", describe(acc))
    rank, world = acc.process_index, acc.num_processes
    out = Path(output_dir)
    ckpt_root = out / "checkpoints"
    order = BatchOrder(dataset, cfg.per_device_batch_size, world, cfg.grad_accum_steps, cfg.seed)
    if order.steps_per_epoch < 1:
        raise ValueError(
            f"the dataset has {order.n} sequences, fewer than one global batch "
            f"({order.global_batch} = {cfg.per_device_batch_size} per device × {world} "
            f"processes × {cfg.grad_accum_steps} accumulation)"
        )
    if hasattr(getattr(dataset, "data", None), "table"):  # a datasets.Dataset: check its ids
        vocab = student.get_input_embeddings().num_embeddings
        check_token_ids(dataset, vocab, "the distillation dataset")
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * order.steps_per_epoch))
    fingerprint = cfg.fingerprint(order.n)
    if targets is None:
        teacher = _freeze_teacher(teacher, cfg, acc.device)
    _prepare_student(student, cfg, acc.device)

    if acc.is_main_process:
        remove_unfinished(ckpt_root)
    acc.wait_for_everyone()
    ckpt = newest_intact(ckpt_root) if resume else None
    if ckpt is None:
        bar = resolve_progress(progress) == "bar" and acc.is_main_process
        _calibrate(student, order, cfg, pad_id, bar)
    optimizer, scheduler = _optimizer_and_schedule(student, cfg, world, total)
    shell = skeleton(student) if needs_gathered_copy(acc) else None
    model, optimizer = acc.prepare(student, optimizer)
    clip_fn, clip_handle = clip_after_step(acc, model, optimizer)

    state: dict[str, Any] = {"step": 0, "skipped_steps": 0}
    if ckpt is not None:
        state = _resume(acc, model, optimizer, scheduler, ckpt, fingerprint, total)
        logger.info("resumed from %s (step %d)", ckpt, state["step"])
    else:
        torch.manual_seed(cfg.seed * 7919 + rank + 1)  # noise streams differ per rank
    start = state["step"]
    resumed_from = start if ckpt is not None else None
    end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)

    guard = _update_guard(acc, model, optimizer, cfg)
    stepper = Stepper(
        acc, model, teacher if targets is None else None, optimizer, order, cfg, pad_id, clip_fn,
        guard, targets,
    )  # fmt: skip
    if cfg.report_to:
        acc.init_trackers("afm-train", config=_hparams(cfg))
    log = TrainLog(
        out,
        start=start,
        total=total,
        end=end,
        skipped=state["skipped_steps"],
        logging_steps=cfg.logging_steps,
        main_process=acc.is_main_process,
        progress=progress,
        accelerator=acc,
        consecutive=state.get("consecutive_skips", 0),
        last_loss=state.get("last_loss"),
        max_consecutive=cfg.max_consecutive_skips,
    )
    try:
        for step in range(start, end):
            outcome = stepper.run(step)
            scheduler.step()
            log.record(step, outcome, scheduler.get_last_lr()[0], acc)
            if log.must_stop:
                raise _stopped(log, step, ckpt)
            done = step + 1
            # The last step is saved too: a finished run can be extended (max_steps raised).
            if cfg.save_steps and (done % cfg.save_steps == 0 or done == end):
                state = {
                    "step": done,
                    "skipped_steps": log.skipped,
                    "consecutive_skips": log.consecutive,
                    "last_loss": log.last_loss,
                    "total_steps": total,
                    "world_size": world,
                    "fingerprint": fingerprint,
                }
                save_checkpoint(acc, model, optimizer, scheduler, ckpt_root, state)
                ckpt = ckpt_root / f"{CKPT_PREFIX}{done:07d}"
                if acc.is_main_process:
                    prune_checkpoints(ckpt_root, cfg.save_total_limit)
    finally:
        log.close()
        if cfg.report_to:
            acc.end_training()
        if clip_handle is not None:
            clip_handle.remove()
    return DistillResult(
        steps=end,
        skipped_steps=log.skipped,
        resumed_from=resumed_from,
        final_loss=log.last_loss,
        log=log.rows,
        model=_finished_student(acc, model, shell, cfg),
    )


def _hparams(cfg: DistillConfig) -> dict[str, Any]:
    """The scalar settings, as trackers accept them (TensorBoard takes no lists)."""
    return {
        k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))
    }


def save_student(student: nn.Module, out_dir: str | Path) -> Path:
    """``save_pretrained`` with the afm quantization config (loads after ``import afm``).

    Pass the whole student (``DistillResult.model``, on the main process).  A student
    holding a non-finite value is refused (:class:`~afm.training.guard.TrainingStopped`),
    nothing written."""
    out = Path(out_dir)
    check_finite(student, f"to save it to {str(out)!r}")
    attach_quantization_config(student)
    student.save_pretrained(out, safe_serialization=True)
    return out
