"""Keeping non-finite values out of the student: checks, the roll-back copy, the error.

A distillation step is skipped (no update, counted) when its loss or its gradient is
not finite; an update that was applied and made a weight or an input range non-finite
is rolled back from a copy taken just before it (``train.nonfinite_guard``).  A model
holding non-finite values is never saved (:func:`check_finite`).  When training cannot
go on — too many skipped steps in a row, or a non-finite update with no copy to undo
it — :class:`TrainingStopped` is raised; the CLI prints it as one line and exits 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TrainingStopped", "UpdateGuard", "check_finite", "nonfinite_tensors"]


class TrainingStopped(RuntimeError):
    """Training stopped because it cannot go on correctly; nothing broken was saved."""


def nonfinite_tensors(named: Any) -> list[tuple[str, int]]:
    """``[(name, number of non-finite values)]`` of the floating-point tensors in
    ``named`` (an iterable of ``(name, tensor)``), in order."""
    out = []
    for name, t in named:
        if t is None or not torch.is_floating_point(t):
            continue
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            out.append((name, n))
    return out


def check_finite(model: nn.Module, what: str) -> None:
    """Raise :class:`TrainingStopped` if a parameter or buffer of ``model`` is not finite
    (``what`` says what was about to happen, e.g. "saving the student to runs/x")."""
    bad = nonfinite_tensors([*model.named_parameters(), *model.named_buffers()])
    if bad:
        total = sum(n for _, n in bad)
        name, n = bad[0]
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise TrainingStopped(
            f"the model holds {total} non-finite values ({n} in {name}{more}); refusing "
            f"{what}: a non-finite model is never saved"
        )


def _visible(p: torch.Tensor) -> torch.Tensor:
    """The values of ``p`` this rank holds (a DeepSpeed ZeRO-3 partition, else ``p``)."""
    return getattr(p, "ds_tensor", p)


class UpdateGuard:
    """The optimizer's parameters before an update, to undo it if it broke them.

    ``rollback=True`` keeps one copy of every parameter and optimizer-state tensor
    (preallocated once, refreshed with ``copy_`` before each update); with ``False``
    nothing is copied and :meth:`params_finite` only detects the damage.
    """

    def __init__(self, optimizer: Any, names: dict[int, str], *, rollback: bool) -> None:
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.params = [p for g in self.inner.param_groups for p in g["params"]]
        self.names = names
        self.rollback = rollback
        self._param_copy: list[torch.Tensor] = []
        self._state_copy: list[dict[str, Any] | None] = []

    def grads_finite(self) -> bool:
        """True when every gradient this rank holds is finite (None counts as finite)."""
        flags = [torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def params_finite(self) -> bool:
        flags = [torch.isfinite(_visible(p)).all() for p in self.params if p.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def first_nonfinite(self) -> str:
        """The name of the first parameter with a non-finite value (for messages)."""
        for p in self.params:
            if p.is_floating_point() and not bool(torch.isfinite(_visible(p)).all()):
                return self.names.get(id(p), f"parameter of shape {tuple(p.shape)}")
        return "no parameter"

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the parameters and optimizer state (no-op without ``rollback``)."""
        if not self.rollback:
            return
        if not self._param_copy:
            self._param_copy = [torch.empty_like(p) for p in self.params]
            self._state_copy = [None] * len(self.params)
        for i, p in enumerate(self.params):
            self._param_copy[i].copy_(p)
            state = self.inner.state.get(p)
            if not state:
                self._state_copy[i] = None
                continue
            kept = self._state_copy[i] or {}
            for k, v in state.items():
                if torch.is_tensor(v):
                    buf = kept.get(k)
                    if not torch.is_tensor(buf) or buf.shape != v.shape or buf.dtype != v.dtype:
                        buf = torch.empty_like(v)
                    kept[k] = buf.copy_(v)
                else:
                    kept[k] = v
            for k in set(kept) - set(state):
                del kept[k]
            self._state_copy[i] = kept

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what :meth:`snapshot` copied: the update never happened."""
        if not self.rollback or not self._param_copy:
            raise RuntimeError("UpdateGuard.restore without a snapshot")
        for i, p in enumerate(self.params):
            p.copy_(self._param_copy[i])
            kept = self._state_copy[i]
            if kept is None:
                self.inner.state.pop(p, None)  # the first update created it: drop it
                continue
            state = self.inner.state[p]
            for k in set(state) - set(kept):
                del state[k]
            for k, v in kept.items():
                cur = state.get(k)
                if torch.is_tensor(v) and torch.is_tensor(cur) and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    state[k] = v.clone() if torch.is_tensor(v) else v
