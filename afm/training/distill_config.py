"""Optimisation and loss settings of the distillation trainer (``train.*`` keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from afm.validation import check_bool, check_choice, check_int, check_real, fail

__all__ = [
    "KD_TARGETS",
    "MIXED_PRECISION",
    "NONFINITE_GUARDS",
    "NOT_IN_FINGERPRINT",
    "TEACHER_DTYPES",
    "TRACKERS",
    "DistillConfig",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
KD_TARGETS = ("auto", "live", "top_k", "sampled")
# accelerate's tracker names (accelerate.utils.LoggerType) that train.report_to accepts.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
NONFINITE_GUARDS = ("auto", "rollback", "stop")
#: Settings a resumed run may change: how often it saves and logs, the trackers, how it
#: guards against divergence (none of them changes the trajectory of applied steps),
#: and max_steps (raised to extend a run; the schedule follows the new total).
NOT_IN_FINGERPRINT = (
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "max_steps",
    "max_consecutive_skips",
    "nonfinite_guard",
)
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    kd_targets: str = "auto"
    """Where the KD targets come from: "live" (the teacher runs on every batch),
    "top_k" / "sampled" (the sparse targets cached in the shards, no teacher loaded:
    ``afm.training.teacher_targets``), or "auto": "sampled" if the shards hold it, else
    "top_k" if they hold it, else "live"."""
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
    """Write a ``log.jsonl`` row (and, off a TTY, a log line) every this many steps."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers through accelerate (``tensorboard``, ``wandb``, ...); their
    files go to ``<output>/trackers``."""
    seed: int = 0

    max_consecutive_skips: int = 20
    """Stop with an error after this many skipped steps in a row (non-finite loss,
    gradient or update): the run has diverged or its data is broken."""
    nonfinite_guard: str = "auto"
    """What happens when an applied update made a weight or an input range non-finite:
    "rollback" restores the state before the step from a copy kept every step (one copy
    of the parameters and AdamW moments), "stop" keeps no copy and stops with an error,
    "auto" is "rollback" except under DeepSpeed (whose optimizer owns the fp32 masters),
    where it is "stop".  Either way no non-finite model is saved."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            fail("train", name, getattr(self, name), why)

        for name in ("max_steps", "save_steps", "save_total_limit"):
            check_int("train", name, getattr(self, name), minimum=1, allow_none=True)
        for name in (
            "per_device_batch_size",
            "grad_accum_steps",
            "kd_chunk_size",
            "logging_steps",
            "max_consecutive_skips",
        ):
            check_int("train", name, getattr(self, name), minimum=1)
        for name in ("num_epochs", "lr", "temperature", "adam_eps"):
            check_real("train", name, getattr(self, name), strict=True)
        for name in ("adam_beta1", "adam_beta2", "warmup_ratio", "beta"):
            check_real("train", name, getattr(self, name), maximum=1.0)
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) == 1:
                bad(name, "must be < 1 (AdamW divides by 1 - beta ** step)")
        for name in ("weight_decay", "lr_end", "lr_power"):
            check_real("train", name, getattr(self, name))
        if self.lr_end >= self.lr:
            bad("lr_end", f"must be smaller than train.lr={self.lr!r} (the decay ends there)")
        if self.max_grad_norm is not None:
            check_real("train", "max_grad_norm", self.max_grad_norm, strict=True)
        check_int(
            "train", "calibration_batches", self.calibration_batches, minimum=0, allow_none=True
        )
        for name in ("scale_lr_by_world_size", "gradient_checkpointing"):
            check_bool("train", name, getattr(self, name))
        check_choice("train", "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("train", "kd_targets", self.kd_targets, KD_TARGETS)
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            bad("teacher_dtype", f"must be one of {sorted(TEACHER_DTYPES)} or None")
        if self.teacher_device is not None and not isinstance(self.teacher_device, str):
            bad("teacher_device", "must be a device name such as 'cuda:1', or None")
        check_choice("train", "nonfinite_guard", self.nonfinite_guard, NONFINITE_GUARDS)
        check_int("train", "seed", self.seed)
        if not isinstance(self.report_to, list) or any(t not in TRACKERS for t in self.report_to):
            bad("report_to", f"must be a list of tracker names from {', '.join(TRACKERS)}")

    def fingerprint(self, dataset_size: int) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint (not the saving cadence)."""
        d = dataclasses.asdict(self)
        for k in NOT_IN_FINGERPRINT:
            d.pop(k)
        d["dataset_size"] = dataset_size
        return d
