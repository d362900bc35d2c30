"""One optimizer step of the distillation trainer: micro-batches, KD loss, the update.

The KD targets come from the live teacher, or, when ``targets`` is set, from the sparse
teacher targets cached in the shards (no teacher forward, no teacher in memory).

A step whose loss or gradient is not finite on any rank is skipped on every rank
at once (no update, gradients dropped), so all ranks keep the same weights.  An update
that made a weight or an input range non-finite on any rank is rolled back on every
rank (or, with no copy to undo it, stops training: :mod:`afm.training.guard`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from afm.training.batches import BatchOrder
from afm.training.distill_config import DistillConfig
from afm.training.guard import TrainingStopped, UpdateGuard
from afm.training.kd_loss import KDLossOutput, causal_lm_labels, kd_loss
from afm.training.sparse_kd import sparse_kd_loss
from afm.training.teacher_targets import CachedTargets

__all__ = ["SKIP_REASONS", "StepOutcome", "Stepper"]

#: Why a step was skipped (``StepOutcome.reason``).
SKIP_REASONS = {
    "loss": "non-finite loss",
    "gradient": "non-finite gradient",
    "overflow": "fp16 overflow (the loss scaler skipped the update)",
    "update": "the update made weights or input ranges non-finite (rolled back)",
}


@dataclass
class StepOutcome:
    """What one step did: whether (and why) it was skipped, its mean losses, tokens."""

    skipped: bool
    sums: torch.Tensor
    """``[loss, kl, lm]`` averaged over micro-batches (zeros when skipped)."""
    tokens: int
    """Tokens of the global batch (all ranks)."""
    reason: str | None = None
    """A key of :data:`SKIP_REASONS` when skipped."""


@dataclass
class Stepper:
    """Everything a step needs; :meth:`run` performs step ``step`` of the order."""

    accelerator: Any
    model: nn.Module
    teacher: nn.Module | None
    optimizer: Any
    order: BatchOrder
    config: DistillConfig
    pad_id: int
    clip_after_step: Callable[[], None] | None
    guard: UpdateGuard
    targets: CachedTargets | None = None
    """Cached sparse teacher targets; None: the live ``teacher``."""

    def run(self, step: int) -> StepOutcome:
        acc, cfg = self.accelerator, self.config
        reason: str | None = None
        sums = torch.zeros(3, device=acc.device)  # loss, kl, lm
        tokens = 0
        for micro in range(cfg.grad_accum_steps):
            idx = self.order.micro_batch(step, micro, acc.process_index)
            batch = self.order.collate(idx, self.pad_id)
            tokens += int(batch["attention_mask"].sum()) * acc.num_processes
            with acc.accumulate(self.model):
                micro_bad, micro_sums = self._micro_step(idx, batch, skip=reason is not None)
                if micro_bad and reason is None:
                    reason = "loss"
                sums += micro_sums
                if acc.sync_gradients:
                    reason = self._update(reason, step)
        return StepOutcome(reason is not None, sums, tokens, reason)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=acc.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)

    def _micro_step(
        self, idx: torch.Tensor, batch: dict[str, torch.Tensor], *, skip: bool
    ) -> tuple[bool, Any]:
        """Forward the student (and the teacher, when live) and back-propagate the KD
        loss (unless the step is bad)."""
        acc, cfg = self.accelerator, self.config
        ids = batch["input_ids"].to(acc.device)
        mask = batch["attention_mask"].to(acc.device)
        if self.targets is None:
            out = self._live_loss(ids, mask)
        else:
            out = self._cached_loss(idx, ids, mask)
        nonfinite = (~torch.isfinite(out.loss.detach())).float()
        if acc.num_processes > 1:
            nonfinite = acc.reduce(nonfinite, reduction="sum")
        bad = skip or nonfinite.item() > 0
        if bad:
            return True, 0.0
        acc.backward(out.loss)
        return False, torch.stack([out.loss.detach(), out.kl, out.lm]) / cfg.grad_accum_steps

    def _live_loss(self, ids: torch.Tensor, mask: torch.Tensor) -> KDLossOutput:
        cfg = self.config
        t_device = next(self.teacher.parameters()).device
        with torch.no_grad():
            t_logits = self.teacher(
                input_ids=ids.to(t_device), attention_mask=mask.to(t_device), use_cache=False
            ).logits.to(ids.device)
        s_logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        labels = causal_lm_labels(ids, mask) if cfg.beta < 1 else None
        return kd_loss(
            s_logits,
            t_logits,
            mask=mask,
            labels=labels,
            temperature=cfg.temperature,
            beta=cfg.beta,
            chunk_size=cfg.kd_chunk_size,
            inplace_backward=True,
        )

    def _cached_loss(
        self, idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> KDLossOutput:
        cfg = self.config
        t_ids, weights, const, valid = self.targets.batch(idx.tolist(), ids.shape[1])
        dev = ids.device
        s_logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        labels = causal_lm_labels(ids, mask) if cfg.beta < 1 else None
        return sparse_kd_loss(
            s_logits,
            t_ids.to(dev),
            weights.to(dev),
            const.to(dev),
            mask=mask * valid.to(dev),
            labels=labels,
            beta=cfg.beta,
            chunk_size=cfg.kd_chunk_size,
            inplace_backward=True,
        )

    def _update(self, reason: str | None, step: int) -> str | None:
        """Check the gradients, clip their norm, step (or drop them), clip the weights,
        check the weights (rolling the update back if it broke them)."""
        acc, cfg = self.accelerator, self.config
        fp16 = acc.mixed_precision == "fp16"  # fp16: the loss scaler skips overflows itself
        if reason is None and not fp16 and self._any_rank(not self.guard.grads_finite()):
            reason = "gradient"
        if reason is None and cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                reason = None if fp16 else "gradient"
        if reason is None:
            self.guard.snapshot()
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                reason = "overflow"
            else:
                if self.clip_after_step is not None:
                    self.clip_after_step()
                if self._any_rank(not self.guard.params_finite()):
                    reason = self._undo(step)
        self.optimizer.zero_grad(set_to_none=True)
        return reason

    def _undo(self, step: int) -> str:
        """Roll back the update of step ``step`` (0-based), or stop when it cannot be."""
        if not self.guard.rollback:
            raise TrainingStopped(
                f"step {step + 1}: the update made {self.guard.first_nonfinite()} non-finite "
                "and train.nonfinite_guard='stop' keeps no copy to undo it; training "
                "stopped, nothing saved after the last checkpoint (lower train.lr)"
            )
        self.guard.restore()
        return "update"
