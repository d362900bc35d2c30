"""Batches for distillation: padding and the deterministic global batch order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BatchOrder", "pad_collate"]


def pad_collate(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into ``input_ids`` / ``attention_mask`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class BatchOrder:
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

    def collate(self, idx: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
        """The padded batch of the rows ``idx``."""
        return pad_collate(self.rows(idx), pad_id)

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
