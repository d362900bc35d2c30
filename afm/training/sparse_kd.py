"""Knowledge distillation from cached sparse teacher targets (no live teacher).

A sparse target gives, per position, ``m`` token ids ``x_j`` with masses ``w_j`` and a
constant ``c`` (:class:`afm.training.teacher_targets.CachedTargets`).  The KD term is

    KL̂ = c − Σ_j w_j · log s(x_j)          s = softmax(student logits), full vocabulary

* top-k: ``w`` = the k teacher probabilities renormalised over the k ids, ``c = Σ w·log w``:
  ``KL̂ = KL(t ‖ s)`` for the truncated teacher ``t``; for ``k = vocab`` it is the full KL.
* sampled: ``w_j = p(x_j) / (n·q(x_j))`` for ``x_j ~ q``, ``c = −H(p)``: ``E[KL̂] = KL(p ‖ s)``
  and ``E[∇KL̂] = ∇KL`` (the gradient ``(Σ_j w_j)·s − Σ_j w_j·e_{x_j}`` is unbiased).

``loss = β · mean(KL̂) + (1 − β) · CE`` (the cached targets are the teacher's T = 1
distribution, so only T = 1 is defined).  Memory-safe like :func:`afm.training.kd_loss.kd_loss`:
a custom autograd function walks the tokens in chunks, saves only its inputs and
recomputes the chunk's softmax in the backward; the only full-size tensor is the
gradient of the student logits (or none, with ``inplace_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from afm.training.kd_loss import (
    KDLossOutput,
    chunked_grad,
    chunked_sums,
    combine_losses,
    token_weights,
)

__all__ = ["naive_sparse_kd_loss", "sparse_kd_loss"]


class _ChunkedSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, ids, w, const, kd_w, kd_scale, labels, lm_count, beta, chunk, inplace):  # noqa: ANN001,E501
        use_kd, use_lm = beta > 0, labels is not None and beta < 1

        def kl(i: int, j: int, sc: Tensor) -> Tensor:
            log_s = sc.gather(1, ids[i:j]) - torch.logsumexp(sc, -1, keepdim=True)
            return const[i:j] - (w[i:j] * log_s).sum(-1)

        kl_sum, lm_sum = chunked_sums(
            s, chunk, kl if use_kd else None, kd_w, labels if use_lm else None
        )
        loss, kd_mean, lm_mean = combine_losses(
            kl_sum, lm_sum, kd_w, kd_scale, lm_count, beta, use_lm
        )
        ctx.save_for_backward(s, ids, w, kd_w, kd_scale, labels if use_lm else None, lm_count)
        ctx.cfg = (beta, chunk, use_kd, inplace)
        ctx.mark_non_differentiable(kd_mean, lm_mean)
        return loss, kd_mean, lm_mean

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2):  # noqa: ANN001
        s, ids, w, kd_w, kd_scale, labels, lm_count = ctx.saved_tensors
        beta, chunk, use_kd, inplace = ctx.cfg

        def kd_grad(i: int, j: int, sc: Tensor) -> Tensor:
            # d/ds of −Σ w·log s(x): (Σ w)·softmax − Σ w·e_x
            wc = w[i:j]
            q = torch.softmax(sc, -1).mul_(wc.sum(-1, keepdim=True))
            q.scatter_add_(1, ids[i:j], -wc)
            return q.mul_((kd_w[i:j] * kd_scale)[:, None])

        grad = chunked_grad(
            s, chunk, kd_grad if use_kd else None, labels, (1.0 - beta) / lm_count,
            grad_loss, inplace,
        )  # fmt: skip
        return grad, None, None, None, None, None, None, None, None, None, None


def _check(student_logits: Tensor, ids: Tensor, weights: Tensor, const: Tensor, beta: float):
    lead = tuple(student_logits.shape[:-1])
    if tuple(ids.shape) != tuple(weights.shape) or tuple(ids.shape[:-1]) != lead:
        raise ValueError(
            f"sparse targets ids {tuple(ids.shape)} / weights {tuple(weights.shape)} do not "
            f"match the student logits {tuple(student_logits.shape)} ([..., m] per position)"
        )
    if tuple(const.shape) != lead:
        raise ValueError(f"target const {tuple(const.shape)} must have shape {lead}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")


def sparse_kd_loss(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    const: Tensor,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    beta: float = 1.0,
    chunk_size: int = 1024,
    inplace_backward: bool = False,
) -> KDLossOutput:
    """Chunked KD loss against sparse targets (module docstring).

    Args:
        student_logits: ``[..., V]``, any float dtype; the gradient comes back in it.
        ids: ``[..., m]`` target token ids (int64, in ``[0, V)``).
        weights: ``[..., m]`` their target masses (0 for padding slots).
        const: ``[...]`` the teacher term of the KL (``Σ t·log t`` or ``−H(p)``).
        mask: ``[...]`` 1 where a position counts (attention mask × has-a-target).
        labels, beta, chunk_size, inplace_backward: as :func:`afm.training.kd_loss.kd_loss`.
    """
    _check(student_logits, ids, weights, const, beta)
    if beta < 1.0 and labels is None:
        raise ValueError("beta < 1 mixes in the LM loss: pass labels")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    v, m = student_logits.shape[-1], ids.shape[-1]
    s = student_logits.reshape(-1, v)
    dev = s.device
    flat_ids = ids.reshape(-1, m).to(device=dev, dtype=torch.long)
    flat_w = weights.reshape(-1, m).to(device=dev, dtype=torch.float32)
    flat_c = const.reshape(-1).to(device=dev, dtype=torch.float32)
    kd_w, kd_scale, lab, lm_count = token_weights(mask, labels, s.shape[0], dev, beta, 1.0)
    loss, kl, lm = _ChunkedSparseKD.apply(
        s, flat_ids, flat_w, flat_c, kd_w, kd_scale, lab, lm_count,
        float(beta), int(chunk_size), bool(inplace_backward),
    )  # fmt: skip
    return KDLossOutput(loss=loss, kl=kl, lm=lm)


def naive_sparse_kd_loss(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    const: Tensor,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    beta: float = 1.0,
) -> KDLossOutput:
    """The straightforward fp32 reference (a full ``log_softmax``, autograd through it)."""
    _check(student_logits, ids, weights, const, beta)
    v, m = student_logits.shape[-1], ids.shape[-1]
    s = student_logits.reshape(-1, v).float()
    log_s = torch.log_softmax(s, -1).gather(1, ids.reshape(-1, m).long())
    kl_tok = const.reshape(-1).float() - (weights.reshape(-1, m).float() * log_s).sum(-1)
    w = torch.ones(s.shape[0]) if mask is None else mask.reshape(-1).float()
    kl = (kl_tok * w).sum() / w.sum().clamp_min(1.0)
    loss = beta * kl
    lm = torch.zeros(())
    if beta < 1.0:
        lm = torch.nn.functional.cross_entropy(s, labels.reshape(-1), ignore_index=-100)
        loss = loss + (1.0 - beta) * lm
    return KDLossOutput(loss=loss, kl=kl.detach(), lm=lm.detach())
