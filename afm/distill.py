"""Distillation of an analog student from its FP teacher (the AFM recipe), on accelerate.

    student = afm.distill.make_student(teacher, "afm-paper")
    result = afm.distill.distill(teacher, student, dataset, DistillConfig(...), "runs/x")

The loop is written on ``accelerate`` directly (not the HF Trainer) so that it
controls what the analog recipe needs: an input-range calibration pass before
any engine wraps the model, weight clipping on the parameters the optimizer
really updates (the fp32 master weights), skipping of non-finite steps on all
ranks at once, and checkpoints that resume the exact trajectory (weights,
optimizer, scheduler, per-rank RNG and data position; safetensors + JSON, no
pickles).  ``accelerate launch`` with the configs in ``configs/accelerate``
runs it on one GPU, DDP, FSDP or DeepSpeed ZeRO-2.

Clipping per engine (no engine source is patched):

* single device / DDP: ``afm.register_clip_hook`` on the torch optimizer inside
  accelerate's wrapper — it holds the fp32 parameters (autocast keeps them fp32)
  and the hook only fires when a step really ran (not on fp16 overflow skips);
* FSDP (v1): after the step, ``FSDP.summon_full_params(writeback=True)`` and clip
  full rows (a shard may split a row);
* DeepSpeed ZeRO 1/2/3: after the engine's step, ``deepspeed.utils.
  safe_get_full_fp32_param`` → clip → ``safe_set_full_fp32_param`` on the
  master copy, then the low-precision copy is refreshed from it.

FSDP and ZeRO-3 shard the student's parameters in place, and DeepSpeed keeps the
fp32 masters apart from the module's (fp16) parameters, so under those engines the
module passed in is not the trained student: :class:`DistillResult` ``.model`` is,
rebuilt on the main process from the fp32 masters — save that one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.calibration import calibrate_input_ranges_
from afm.clipping import clip_weights_, register_clip_hook
from afm.config import AnalogConfig
from afm.data import pad_collate
from afm.engine_state import full_parameters, needs_gathered_copy
from afm.hf import attach_quantization_config
from afm.kd_loss import causal_lm_labels, kd_loss
from afm.patch import analog_layers, convert
from afm.presets import get_preset
from afm.reference import clip_weight_
from afm.train_checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DistillConfig",
    "DistillResult",
    "distill",
    "list_checkpoints",
    "make_accelerator",
    "make_student",
    "save_student",
]

_MIXED = ("no", "bf16", "fp16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DistillConfig:
    """Optimisation and loss settings; defaults are the AFM paper's."""

    max_steps: int | None = None
    """Optimizer steps; None derives them from ``num_epochs``."""
    num_epochs: float = 2.0
    per_device_batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 5e-7
    """Peak learning rate per process (paper: 5e-7 per GPU)."""
    scale_lr_by_world_size: bool = True
    """Multiply ``lr`` by the number of processes (the paper's rule)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices; never on biases, norms or ``input_range``."""
    warmup_ratio: float = 0.016
    lr_end: float = 0.0
    lr_power: float = 1.0
    """Polynomial decay power (1 = linear)."""
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    beta: float = 1.0
    """Weight of the KD term; ``1 - beta`` weights the next-token LM loss."""
    kd_chunk_size: int = 1024
    calibration_batches: int | None = None
    """Input-range calibration batches; None uses the preset's ``init_steps``."""
    mixed_precision: str = "no"
    """"no", "bf16" or "fp16" (autocast; master weights stay fp32)."""
    gradient_checkpointing: bool = False
    teacher_dtype: str | None = None
    """Run the teacher in "bfloat16" / "float16" / "float32" (None: unchanged)."""
    teacher_device: str | None = None
    """Put the teacher on another device (None: the training device)."""
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"train.{name}={getattr(self, name)!r} is invalid: {why}")

        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive int" + (" or None" if allow_none else ""))

        pos_int("max_steps", True)
        pos_int("per_device_batch_size")
        pos_int("grad_accum_steps")
        pos_int("kd_chunk_size")
        pos_int("save_steps", True)
        pos_int("save_total_limit", True)
        pos_int("logging_steps")
        for name in ("num_epochs", "lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                bad(name, "must be a number > 0")
        for name in ("adam_beta1", "adam_beta2", "warmup_ratio", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                bad(name, "must be in [0, 1]")
        for name in ("adam_eps", "weight_decay", "lr_end", "lr_power"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                bad(name, "must be a number >= 0")
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
        ):
            bad("max_grad_norm", "must be > 0 or None")
        if self.calibration_batches is not None and (
            not isinstance(self.calibration_batches, int) or self.calibration_batches < 0
        ):
            bad("calibration_batches", "must be an int >= 0 or None")
        if self.mixed_precision not in _MIXED:
            bad("mixed_precision", f"must be one of {_MIXED}")
        if self.teacher_dtype is not None and self.teacher_dtype not in _DTYPES:
            bad("teacher_dtype", f"must be one of {sorted(_DTYPES)} or None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "must be an int")


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
    teacher: nn.Module, preset: str | AnalogConfig = "afm-paper", **convert_kwargs: Any
) -> nn.Module:
    """A deep copy of ``teacher`` with its linear layers converted (output head stays digital)."""
    config = get_preset(preset) if isinstance(preset, str) else preset
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    convert(student, config, **convert_kwargs)
    for layer in analog_layers(student).values():
        layer.input_range.requires_grad_(layer.analog_config.input.uses_range)
    student.train()
    return student


def _freeze_teacher(teacher: nn.Module, cfg: DistillConfig, device: torch.device) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.teacher_dtype is not None:
        teacher.to(_DTYPES[cfg.teacher_dtype])
    teacher.to(torch.device(cfg.teacher_device) if cfg.teacher_device else device)
    return teacher


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------- data order


class _Order:
    """Deterministic global batch order: step ``s`` always sees the same sequences."""

    def __init__(self, dataset: Any, per_device: int, world: int, accum: int, seed: int) -> None:
        self.data = dataset
        self.n = len(dataset)
        self.per_device, self.world, self.accum, self.seed = per_device, world, accum, seed
        self.global_batch = per_device * world * accum
        self.steps_per_epoch = self.n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def rows(self, idx: torch.Tensor) -> list[list[int]]:
        sel = self.data[idx.tolist()]
        return sel["input_ids"] if isinstance(sel, dict) else [r["input_ids"] for r in sel]

    def micro_batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + (micro * self.world + rank) * self.per_device
        return self.perm(epoch)[start : start + self.per_device]

    def calibration(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` micro-batches of the order, the same on every rank."""
        out, step = [], 0
        while len(out) < count:
            perm = self.perm(step // max(1, self.n // self.per_device))
            k = step % max(1, self.n // self.per_device)
            out.append(perm[k * self.per_device : (k + 1) * self.per_device])
            step += 1
        return out


# --------------------------------------------------------------------------- sharding engines


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory).

    Taken before the engine wraps the student, it keeps the structure, the analog
    configs, buffers and tied parameters; :func:`_rebuild` fills it with trained values.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(module, memo)


def _rebuild(skeleton: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """Materialise ``skeleton``'s parameters from whole trained values (ties preserved)."""
    new: dict[int, nn.Parameter] = {}
    for mod in skeleton.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
            mod._parameters[name] = new[id(p)]
    own = dict(skeleton.named_parameters())  # tied parameters once, as in ``params``
    if own.keys() != params.keys():
        raise RuntimeError(
            "gathered parameters do not match the student: missing "
            f"{sorted(own.keys() - params.keys())}, unexpected {sorted(params.keys() - own.keys())}"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])
    return skeleton


# --------------------------------------------------------------------------- clipping


def _refresh_forward_copy(weight: nn.Parameter, master: torch.Tensor) -> None:
    """Copy the clipped master into the parameter the forward reads (DeepSpeed).

    ``safe_set_full_fp32_param`` only writes the optimizer's fp32 partition; the
    forward reads the (low-precision) parameter, which DeepSpeed refreshes from the
    master only at the next step — without this the forward would see every clip one
    step late and the final weights would be unclipped.
    """
    if hasattr(weight, "ds_id"):  # ZeRO-3: gather, overwrite, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            weight.data.copy_(master.view_as(weight))
    elif weight.numel() == master.numel():  # ZeRO-1/2: full parameter on every rank
        weight.data.copy_(master.view_as(weight))


def _clip_master_fn(accelerator: Any, model: nn.Module, optimizer: Any):
    """Install / return the clipping that acts on the weights the optimizer updates."""
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    unwrapped = accelerator.unwrap_model(model)
    if dt == DistributedType.DEEPSPEED:

        def clip_ds() -> None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            for layer in analog_layers(unwrapped).values():
                clip = layer.analog_config.clip
                if clip.kind.value == "none":
                    continue
                master = safe_get_full_fp32_param(layer.weight)
                if master is None:
                    continue
                clip_weight_(master, clip.kind, clip.sigma)
                safe_set_full_fp32_param(layer.weight, master)  # the optimizer's copy
                _refresh_forward_copy(layer.weight, master)

        return clip_ds, None
    if dt == DistributedType.FSDP:

        def clip_fsdp() -> None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=True, with_grads=False):
                clip_weights_(unwrapped)

        return clip_fsdp, None
    inner = getattr(optimizer, "optimizer", optimizer)
    return None, register_clip_hook(inner, unwrapped)


# --------------------------------------------------------------------------- training


def make_accelerator(cfg: DistillConfig) -> Any:
    """The ``Accelerator`` for ``cfg`` (gloo DDP when launched on CPUs)."""
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        cpu=not torch.cuda.is_available(),  # under torchrun on CPU: gloo DDP
    )


def _fingerprint(cfg: DistillConfig, n: int) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in ("save_steps", "save_total_limit", "logging_steps"):
        d.pop(k)
    d["dataset_size"] = n
    return d


def distill(
    teacher: nn.Module,
    student: nn.Module,
    dataset: Any,
    config: DistillConfig,
    output_dir: str | Path,
    *,
    pad_id: int = 0,
    accelerator: Any = None,
    resume: bool = True,
    max_steps_this_run: int | None = None,
    progress: bool = True,
) -> DistillResult:
    """Distil ``teacher`` into the analog ``student`` on ``dataset`` (rows of ``input_ids``).

    Checkpoints go to ``output_dir/checkpoints``; with ``resume`` the latest one is
    loaded first (same config and dataset size required) and the run continues the
    same trajectory.  ``max_steps_this_run`` stops early (time-sliced jobs, tests).
    The student is trained in place (single device, DDP); under FSDP / DeepSpeed use
    ``result.model``, the whole fp32 student gathered onto the main process.  Either
    way ``result.model`` is the one to save with :func:`save_student`.
    """
    from transformers import get_polynomial_decay_schedule_with_warmup

    cfg = config
    if not analog_layers(student):
        raise ValueError("the student has no AnalogLinear layers: use make_student / afm.convert")
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    if getattr(acc, "is_fsdp2", False):
        raise ValueError(
            "FSDP2 (fsdp_version: 2) is not supported: clipping and checkpoints use FSDP v1 "
            "APIs; set fsdp_version: 1 (configs/accelerate/fsdp-multinode.yaml)"
        )
    rank, world = acc.process_index, acc.num_processes
    out = Path(output_dir)
    ckpt_root = out / "checkpoints"
    order = _Order(dataset, cfg.per_device_batch_size, world, cfg.grad_accum_steps, cfg.seed)
    if order.steps_per_epoch < 1:
        raise ValueError(
            f"the dataset has {order.n} sequences, fewer than one global batch "
            f"({order.global_batch} = {cfg.per_device_batch_size} per device × {world} "
            f"processes × {cfg.grad_accum_steps} accumulation)"
        )
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * order.steps_per_epoch))
    fingerprint = _fingerprint(cfg, order.n)
    device = acc.device
    teacher = _freeze_teacher(teacher, cfg, device)
    t_device = next(teacher.parameters()).device
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

    def batch_of(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return pad_collate(order.rows(idx), pad_id)

    checkpoints = list_checkpoints(ckpt_root) if resume else []
    ckpt = checkpoints[-1] if checkpoints else None
    if ckpt is None:
        n_cal = cfg.calibration_batches
        if n_cal is None:
            n_cal = max(
                (la.analog_config.input.init_steps for la in analog_layers(student).values()),
                default=0,
            )
        if n_cal > 0:
            calibrate_input_ranges_(
                student,
                (batch_of(i) for i in order.calibration(n_cal)),
                max_steps=n_cal,
                progress=progress and acc.is_main_process,
            )
    lr = cfg.lr * (world if cfg.scale_lr_by_world_size else 1)
    optimizer = torch.optim.AdamW(
        _param_groups(student, cfg.weight_decay),
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
    skeleton = _skeleton(student) if needs_gathered_copy(acc) else None
    model, optimizer = acc.prepare(student, optimizer)
    clip_after_step, clip_handle = _clip_master_fn(acc, model, optimizer)

    start, skipped, resumed_from = 0, 0, None
    log: list[dict[str, Any]] = []
    if ckpt is not None:
        state = load_checkpoint(acc, model, optimizer, scheduler, ckpt)
        if state["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {ckpt} belongs to a run with different settings; "
                "use another output directory"
            )
        start, skipped, resumed_from = state["step"], state["skipped_steps"], state["step"]
        logger.info("resumed from %s (step %d)", ckpt, start)
    else:
        torch.manual_seed(cfg.seed * 7919 + rank + 1)  # noise streams differ per rank
    end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=start,
        desc="distilling",
        unit="step",
        disable=not progress or not acc.is_main_process,
    )
    log_path = out / "log.jsonl"
    t_last, tokens_since, last_loss = time.perf_counter(), 0, None
    try:
        for step in range(start, end):
            step_bad = False
            sums = torch.zeros(3, device=device)  # loss, kl, lm
            for micro in range(cfg.grad_accum_steps):
                batch = batch_of(order.micro_batch(step, micro, rank))
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                tokens_since += int(mask.sum()) * world
                with acc.accumulate(model):
                    with torch.no_grad():
                        t_logits = teacher(
                            input_ids=ids.to(t_device),
                            attention_mask=mask.to(t_device),
                            use_cache=False,
                        ).logits.to(device)
                    s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    labels = causal_lm_labels(ids, mask) if cfg.beta < 1 else None
                    loss_out = kd_loss(
                        s_logits,
                        t_logits,
                        mask=mask,
                        labels=labels,
                        temperature=cfg.temperature,
                        beta=cfg.beta,
                        chunk_size=cfg.kd_chunk_size,
                        inplace_backward=True,
                    )
                    del t_logits
                    bad = (~torch.isfinite(loss_out.loss.detach())).float()
                    if world > 1:
                        bad = acc.reduce(bad, reduction="sum")
                    if bad.item() > 0:
                        step_bad = True
                    if not step_bad:
                        acc.backward(loss_out.loss)
                        sums += (
                            torch.stack([loss_out.loss.detach(), loss_out.kl, loss_out.lm])
                            / cfg.grad_accum_steps
                        )
                    del s_logits, loss_out
                    if acc.sync_gradients:
                        grad_norm = None
                        if not step_bad and cfg.max_grad_norm is not None:
                            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                            if grad_norm is not None and not torch.isfinite(
                                torch.as_tensor(grad_norm)
                            ):
                                step_bad = acc.mixed_precision != "fp16"  # fp16: scaler skips
                        if step_bad:
                            optimizer.zero_grad(set_to_none=True)
                        else:
                            optimizer.step()
                            if acc.optimizer_step_was_skipped:
                                step_bad = True
                            elif clip_after_step is not None:
                                clip_after_step()
                            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if step_bad:
                skipped += 1
                logger.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d so far)",
                    step + 1,
                    skipped,
                )
            else:
                if world > 1:
                    sums = acc.reduce(sums, reduction="mean")
                last_loss = float(sums[0])
            bar.update(1)
            done = step + 1
            if done % cfg.logging_steps == 0 or done == end:
                now = time.perf_counter()
                row = {
                    "step": done,
                    "loss": last_loss,
                    "kl": float(sums[1]) if not step_bad else None,
                    "lm": float(sums[2]) if not step_bad else None,
                    "lr": scheduler.get_last_lr()[0],
                    "skipped_steps": skipped,
                    "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                }
                t_last, tokens_since = now, 0
                log.append(row)
                bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "nan")
                if acc.is_main_process:
                    out.mkdir(parents=True, exist_ok=True)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
            if cfg.save_steps and (done % cfg.save_steps == 0 or done == end) and done < total:
                state = {
                    "step": done,
                    "skipped_steps": skipped,
                    "total_steps": total,
                    "world_size": world,
                    "fingerprint": fingerprint,
                }
                save_checkpoint(acc, model, optimizer, scheduler, ckpt_root, state)
                if acc.is_main_process:
                    prune_checkpoints(ckpt_root, cfg.save_total_limit)
    finally:
        bar.close()
        if clip_handle is not None:
            clip_handle.remove()
    acc.wait_for_everyone()
    if skeleton is not None:
        full = full_parameters(acc, model)  # collective: every rank takes part
        trained = _rebuild(skeleton, full) if acc.is_main_process else None
    else:
        trained = acc.unwrap_model(model)
    if trained is not None:
        if cfg.gradient_checkpointing:
            disable = getattr(trained, "activation_checkpointing_disable", None) or (
                trained.gradient_checkpointing_disable
            )
            disable()
        trained.eval()
    return DistillResult(
        steps=end,
        skipped_steps=skipped,
        resumed_from=resumed_from,
        final_loss=last_loss,
        log=log,
        model=trained,
    )


def save_student(student: nn.Module, out_dir: str | Path, *, accelerator: Any = None) -> Path:
    """``save_pretrained`` with the afm quantization config (loads after ``import afm``)."""
    out = Path(out_dir)
    model = accelerator.unwrap_model(student) if accelerator is not None else student
    attach_quantization_config(model)
    if accelerator is not None and accelerator.num_processes > 1:
        state = accelerator.get_state_dict(student)
        if accelerator.is_main_process:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        accelerator.wait_for_everyone()
    else:
        model.save_pretrained(out, safe_serialization=True)
    return out


def analog_summary(model: nn.Module) -> dict[str, Any]:
    """Number of analog layers and the range of their learned input ranges."""
    ranges = [la.input_range.detach().float() for la in analog_layers(model).values()]
    if not ranges:
        return {"analog_layers": 0}
    flat = torch.cat(ranges)
    return {
        "analog_layers": len(ranges),
        "input_range_min": float(flat.min()),
        "input_range_max": float(flat.max()),
        "input_range_mean": float(flat.mean()),
    }
