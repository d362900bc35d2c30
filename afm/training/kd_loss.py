"""Memory-safe knowledge-distillation loss: forward KL at temperature T mixed with the LM loss.

    loss = β · T² · KL(p_T(teacher) ‖ p_T(student)) + (1 − β) · CE(student, next token)

KL is averaged over the tokens where ``mask`` is 1 (padding excluded), CE over
the tokens whose label is not ``ignore_index``.  The paper uses β = 1, T = 1.

A naive implementation keeps several fp32 ``tokens × vocab`` tensors alive
(``log_softmax`` of both models, the teacher probabilities, their product, and
as many again in the backward pass).  :func:`kd_loss` is a custom autograd
function that walks over the tokens in chunks of ``chunk_size`` rows, saves
only its inputs, and recomputes the per-chunk softmaxes in the backward pass:
the only full-size tensor it allocates is the gradient of the student logits
(in their own dtype), which autograd needs anyway.  :func:`naive_kd_loss` is
the straightforward reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KDLossOutput",
    "causal_lm_labels",
    "chunked_grad",
    "chunked_sums",
    "combine_losses",
    "kd_loss",
    "lm_chunk_grad",
    "lm_chunk_loss",
    "naive_kd_loss",
    "peak_cpu_memory",
    "token_weights",
]


@dataclass
class KDLossOutput:
    loss: Tensor
    """The scalar to back-propagate."""
    kl: Tensor
    """Mean KL per unmasked token (detached, no T² factor)."""
    lm: Tensor
    """Mean next-token cross entropy (detached; 0 when β = 1 and it is not computed)."""


def causal_lm_labels(input_ids: Tensor, attention_mask: Tensor | None, ignore_index: int = -100):
    """Next-token labels aligned with the logits: position i is scored on token i + 1."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = ignore_index
        labels[attention_mask == 0] = ignore_index
    return labels


def token_weights(
    mask: Tensor | None, labels: Tensor | None, n: int, device, beta: float, t: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Per-token KD weights (the mask), the KD scale ``β·T²/count``, the flat labels and
    their count (shared by the dense and the sparse KD losses)."""
    if mask is None:
        kd_w = torch.ones(n, device=device, dtype=torch.float32)
    else:
        kd_w = mask.reshape(-1).to(device=device, dtype=torch.float32)
    kd_count = kd_w.sum().clamp_min(1.0)
    kd_scale = beta * t * t / kd_count
    if labels is not None and beta < 1.0:
        lab = labels.reshape(-1).to(device)
        lm_count = (lab >= 0).sum().clamp_min(1).float()
    else:
        lab, lm_count = None, torch.ones((), device=device)
    return kd_w, kd_scale, lab, lm_count


def lm_chunk_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross entropy of fp32 ``logits`` [n, V] (labels < 0 ignored)."""
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return (ce * (labels >= 0)).sum()


def lm_chunk_grad(logits: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """``scale ·`` the gradient of :func:`lm_chunk_loss` with respect to ``logits``."""
    p = torch.softmax(logits, -1)
    p[torch.arange(logits.shape[0], device=logits.device), labels.clamp_min(0)] -= 1.0
    return p.mul_((scale * (labels >= 0).float())[:, None])


def chunked_sums(
    s: Tensor,
    chunk: int,
    kl_of_chunk: Callable[[int, int, Tensor], Tensor] | None,
    kd_w: Tensor,
    labels: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Walk the fp32 logits ``s`` in chunks: ``Σ kd_w · kl_of_chunk(i, j, s[i:j])`` (None:
    no KD term) and the summed LM cross entropy (None labels: none)."""
    kl_sum = torch.zeros((), device=s.device, dtype=torch.float32)
    lm_sum = torch.zeros((), device=s.device, dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        j = min(s.shape[0], i + chunk)
        sc = s[i:j].float()
        if kl_of_chunk is not None:
            kl_sum += (kl_of_chunk(i, j, sc) * kd_w[i:j]).sum()
        if labels is not None:
            lm_sum += lm_chunk_loss(sc, labels[i:j])
    return kl_sum, lm_sum


def combine_losses(
    kl_sum: Tensor, lm_sum: Tensor, kd_w: Tensor, kd_scale: Tensor, lm_count: Tensor,
    beta: float, use_lm: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(loss, mean KL, mean LM)`` from the chunked sums."""
    kd_mean = kl_sum / kd_w.sum().clamp_min(1.0)
    lm_mean = lm_sum / lm_count
    loss = kd_scale * kl_sum + (1.0 - beta) * lm_mean if use_lm else kd_scale * kl_sum
    return loss, kd_mean, lm_mean


def chunked_grad(
    s: Tensor,
    chunk: int,
    kd_grad_of_chunk: Callable[[int, int, Tensor], Tensor] | None,
    labels: Tensor | None,
    lm_scale: Tensor,
    grad_loss: Tensor,
    inplace: bool,
) -> Tensor:
    """The gradient of the chunked loss with respect to ``s``, chunk by chunk:
    ``kd_grad_of_chunk(i, j, s[i:j])`` plus ``lm_scale ·`` the LM gradient.

    In place, the gradient overwrites the logits' storage (no new full-size tensor);
    safe by construction: a node that saved the logits fails loudly on their version.
    """
    grad = s if inplace else torch.empty_like(s)
    g = grad_loss.float()
    for i in range(0, s.shape[0], chunk):
        j = min(s.shape[0], i + chunk)
        sc = s[i:j].float()
        out = torch.zeros_like(sc)
        if kd_grad_of_chunk is not None:
            out += kd_grad_of_chunk(i, j, sc)
        if labels is not None:
            out += lm_chunk_grad(sc, labels[i:j], lm_scale)
        grad[i:j] = (out * g).to(grad.dtype)
    return grad


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, kd_w, kd_scale, labels, lm_count, temperature, beta, chunk, inplace):  # noqa: ANN001,E501
        use_kd, use_lm = beta > 0, labels is not None and beta < 1

        def kl(i: int, j: int, sc: Tensor) -> Tensor:
            log_q = torch.log_softmax(sc / temperature, -1)
            log_p = torch.log_softmax(t[i:j].float() / temperature, -1)
            return (log_p.exp() * (log_p - log_q)).sum(-1)

        kl_sum, lm_sum = chunked_sums(
            s, chunk, kl if use_kd else None, kd_w, labels if use_lm else None
        )
        loss, kd_mean, lm_mean = combine_losses(
            kl_sum, lm_sum, kd_w, kd_scale, lm_count, beta, use_lm
        )
        ctx.save_for_backward(s, t, kd_w, kd_scale, labels if use_lm else None, lm_count)
        ctx.cfg = (temperature, beta, chunk, use_kd, inplace)
        ctx.mark_non_differentiable(kd_mean, lm_mean)
        return loss, kd_mean, lm_mean

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2):  # noqa: ANN001
        s, t, kd_w, kd_scale, labels, lm_count = ctx.saved_tensors
        temperature, beta, chunk, use_kd, inplace = ctx.cfg

        def kd_grad(i: int, j: int, sc: Tensor) -> Tensor:
            q = torch.softmax(sc / temperature, -1)
            q -= torch.softmax(t[i:j].float() / temperature, -1)
            # d(T²·KL)/ds = T·(q − p); kd_scale already holds β·T²/count.
            return q.mul_((kd_w[i:j] * (kd_scale / temperature))[:, None])

        grad = chunked_grad(
            s, chunk, kd_grad if use_kd else None, labels, (1.0 - beta) / lm_count,
            grad_loss, inplace,
        )  # fmt: skip
        return grad, None, None, None, None, None, None, None, None, None


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 1.0,
    chunk_size: int = 1024,
    inplace_backward: bool = False,
) -> KDLossOutput:
    """Chunked KD loss on ``[..., vocab]`` logits (see the module docstring).

    Args:
        student_logits: any float dtype; the gradient comes back in that dtype.
        teacher_logits: same shape; never receives a gradient.
        mask: ``[...]`` 1 for tokens that count in the KL (e.g. the attention mask).
        labels: ``[...]`` next-token ids, ``-100`` ignored; needed when ``beta < 1``.
        temperature: T; the KL term is multiplied by T².
        beta: weight of the KD term; ``1 − beta`` weights the LM loss.
        chunk_size: tokens per chunk (peak extra memory ≈ 4 · chunk · vocab · 4 bytes).
        inplace_backward: write the gradient into the student logits' storage instead
            of a new tensor (the logits are garbage afterwards).  The trainer uses it;
            if another autograd node saved the logits, backward raises instead.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if beta < 1.0 and labels is None:
        raise ValueError("beta < 1 mixes in the LM loss: pass labels")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    n = s.shape[0]
    kd_w, kd_scale, lab, lm_count = token_weights(mask, labels, n, s.device, beta, temperature)
    loss, kl, lm = _ChunkedKD.apply(
        s,
        t,
        kd_w,
        kd_scale,
        lab,
        lm_count,
        float(temperature),
        float(beta),
        int(chunk_size),
        bool(inplace_backward),
    )
    return KDLossOutput(loss=loss, kl=kl, lm=lm)


def naive_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 1.0,
) -> KDLossOutput:
    """The straightforward fp32 reference (materialises several tokens × vocab tensors)."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.detach().reshape(-1, v).float()
    w = torch.ones(s.shape[0]) if mask is None else mask.reshape(-1).float()
    w = w.to(s.device)
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    kl_tok = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl = (kl_tok * w).sum() / w.sum().clamp_min(1.0)
    loss = beta * temperature**2 * kl
    lm = torch.zeros((), device=s.device)
    if beta < 1.0:
        lm = torch.nn.functional.cross_entropy(
            s, labels.reshape(-1).to(s.device), ignore_index=-100
        )
        loss = loss + (1.0 - beta) * lm
    return KDLossOutput(loss=loss, kl=kl.detach(), lm=lm.detach())


def peak_cpu_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch on the CPU while ``fn()`` runs (via ``torch.profiler``).

    Counts allocations made inside ``fn`` only (tensors that exist before it are not
    counted); returns the high-water mark of the running allocated total.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
