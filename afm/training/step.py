"""One optimizer step of the distillation trainer: micro-batches, KD loss, the update.

The KD targets come from the live teacher, or, when ``targets`` is set, from the sparse
teacher targets cached in the shards (no teacher forward, no teacher in memory).

A step whose loss or gradient is not finite on any rank is skipped on every rank
at once (no update, gradients dropped), so all ranks keep the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from afm.training.batches import BatchOrder
from afm.training.distill_config import DistillConfig
from afm.training.kd_loss import KDLossOutput, causal_lm_labels, kd_loss
from afm.training.sparse_kd import sparse_kd_loss
from afm.training.teacher_targets import CachedTargets

__all__ = ["StepOutcome", "Stepper"]


@dataclass
class StepOutcome:
    """What one step did: whether it was skipped, its mean losses, tokens it saw."""

    skipped: bool
    sums: torch.Tensor
    """``[loss, kl, lm]`` averaged over micro-batches (zeros when skipped)."""
    tokens: int
    """Tokens of the global batch (all ranks)."""


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
    targets: CachedTargets | None = None
    """Cached sparse teacher targets; None: the live ``teacher``."""

    def run(self, step: int) -> StepOutcome:
        acc, cfg = self.accelerator, self.config
        bad = False
        sums = torch.zeros(3, device=acc.device)  # loss, kl, lm
        tokens = 0
        for micro in range(cfg.grad_accum_steps):
            idx = self.order.micro_batch(step, micro, acc.process_index)
            batch = self.order.collate(idx, self.pad_id)
            tokens += int(batch["attention_mask"].sum()) * acc.num_processes
            with acc.accumulate(self.model):
                micro_bad, micro_sums = self._micro_step(idx, batch, skip=bad)
                bad = bad or micro_bad
                sums += micro_sums
                if acc.sync_gradients:
                    bad = self._update(bad)
        return StepOutcome(bad, sums, tokens)

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

    def _update(self, bad: bool) -> bool:
        """Clip the gradient norm, step (or drop the gradients), clip the weights."""
        acc, cfg = self.accelerator, self.config
        if not bad and cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                bad = acc.mixed_precision != "fp16"  # fp16: the scaler skips the step itself
        if not bad:
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                bad = True
            elif self.clip_after_step is not None:
                self.clip_after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return bad
