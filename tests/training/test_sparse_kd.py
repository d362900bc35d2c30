"""Sparse-target KD loss: against the full KL where it must agree, and its reference."""

from __future__ import annotations

import pytest
import torch

from afm.training.kd_loss import causal_lm_labels, kd_loss, naive_kd_loss, peak_cpu_memory
from afm.training.sparse_kd import naive_sparse_kd_loss, sparse_kd_loss
from afm.training.teacher_targets import TargetSpec, sparse_targets


def _logits(b=2, length=9, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(b, length, v, generator=g)).requires_grad_(True)
    t = 2 * torch.randn(b, length, v, generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    if b > 1:
        mask[1, 6:] = 0
    return s, t, mask


def _top_k_targets(t, k):
    """The stored top-k form of ``t`` as the trainer reads it (renormalised, fp32)."""
    logp = torch.log_softmax(t, -1)
    values, ids = logp.topk(k, -1)
    logt = torch.log_softmax(values, -1)
    return ids, logt.exp(), (logt.exp() * logt).sum(-1)


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_top_k_with_k_equal_vocab_is_the_full_kl(beta, chunk):
    s, t, mask = _logits()
    ids, w, c = _top_k_targets(t, t.shape[-1])
    labels = causal_lm_labels(torch.randint(0, 37, mask.shape), mask)
    full = naive_kd_loss(s, t, mask=mask, labels=labels, beta=beta)
    (g_full,) = torch.autograd.grad(full.loss, s)
    out = sparse_kd_loss(s, ids, w, c, mask=mask, labels=labels, beta=beta, chunk_size=chunk)
    (g,) = torch.autograd.grad(out.loss, s)
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl, full.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-7)


def test_top_k_below_vocab_is_biased():
    s, t, mask = _logits()
    ids, w, c = _top_k_targets(t, 4)
    full = naive_kd_loss(s, t, mask=mask)
    out = sparse_kd_loss(s, ids, w, c, mask=mask)
    assert abs(out.kl.item() - full.kl.item()) > 0.05  # truncation changes the target


@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunked_matches_naive_reference(chunk):
    s, t, mask = _logits(seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (2, 9, 5), generator=g)
    w = torch.rand(2, 9, 5, generator=g)
    c = torch.randn(2, 9, generator=g)
    labels = causal_lm_labels(torch.randint(0, 37, mask.shape, generator=g), mask)
    for beta in (1.0, 0.3, 0.0):
        ref = naive_sparse_kd_loss(s, ids, w, c, mask=mask, labels=labels, beta=beta)
        (g_ref,) = torch.autograd.grad(ref.loss, s)
        out = sparse_kd_loss(s, ids, w, c, mask=mask, labels=labels, beta=beta, chunk_size=chunk)
        (g_out,) = torch.autograd.grad(out.loss, s)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_estimator_is_unbiased_for_loss_and_gradient(tau):
    """The mean over many independent draws of the sampled targets → the full KL and its
    gradient (tolerance: 5 standard errors of the mean, measured from the draws)."""
    draws, n_pos, v = 4000, 4, 23
    s, t, _ = _logits(b=1, length=n_pos, v=v, seed=2)
    full = naive_kd_loss(s, t)
    (g_full,) = torch.autograd.grad(full.loss, s)
    spec = TargetSpec(("sampled",), samples=12, proposal_temperature=tau)
    tg = sparse_targets(t.reshape(-1, v).repeat(draws, 1), spec, torch.Generator().manual_seed(3))
    ids = torch.from_numpy(tg["sampled_ids"]).long().reshape(draws, n_pos, 12)
    w = torch.from_numpy(tg["sampled_weights"]).float().reshape(draws, n_pos, 12)
    c = -torch.from_numpy(tg["entropy"]).reshape(draws, n_pos)
    # One draw per copy of the student's logits: the gradient of the mean over all copies
    # is the mean of the per-draw gradients / draws.
    s_rep = s.detach().repeat(draws, 1, 1).requires_grad_(True)
    out = sparse_kd_loss(s_rep, ids, w, c, chunk_size=1000)
    (g_rep,) = torch.autograd.grad(out.loss, s_rep)
    grads = g_rep * draws  # [draws, n_pos, v]: each draw's gradient of its own mean KL
    log_s = torch.log_softmax(s.detach(), -1).expand(draws, n_pos, v).gather(2, ids)
    losses = (c - (w * log_s).sum(-1)).mean(1)  # each draw's loss
    torch.testing.assert_close(out.loss, losses.mean(), rtol=1e-5, atol=1e-6)
    se = losses.std() / draws**0.5
    assert abs(losses.mean() - full.loss) < 5 * se + 2e-3  # fp16 weights: ~1e-3 bias
    g_se = grads.std(0) / draws**0.5
    assert ((grads.mean(0) - g_full[0]).abs() <= 5 * g_se + 2e-4).all()
    # and a single draw is not the full KL (the test would pass a copy of the teacher)
    assert (losses - full.loss).abs().max() > 10 * se


def test_inplace_backward_and_memory():
    v, n = 4096, 1024
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(n, v, generator=g)
    ids = torch.randint(0, v, (n, 12), generator=g)
    w = torch.full((n, 12), 1 / 12)
    c = torch.zeros(n)
    grads = []
    for inplace in (False, True):
        s = s0.clone().requires_grad_(True)
        logits = s * 1.0  # a producer that does not save its output
        out = sparse_kd_loss(logits, ids, w, c, chunk_size=128, inplace_backward=inplace)
        out.loss.backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1])

    def chunked():
        s = s0.clone().requires_grad_(True)
        sparse_kd_loss(s * 1.0, ids, w, c, chunk_size=128, inplace_backward=True).loss.backward()

    def dense():
        s = s0.clone().requires_grad_(True)
        t = s0.clone()
        kd_loss(s * 1.0, t, chunk_size=128, inplace_backward=True).loss.backward()

    # Beyond the logits, their copy and their gradient (3 × n·v·4 bytes): chunks only.
    full = n * v * 4
    assert peak_cpu_memory(chunked) < 3 * full + 4 * 128 * v * 4 + full / 4
    assert peak_cpu_memory(chunked) <= peak_cpu_memory(dense)


def test_validation():
    s, t, mask = _logits()
    ids, w, c = _top_k_targets(t, 3)
    with pytest.raises(ValueError, match="do not match"):
        sparse_kd_loss(s, ids[:, :5], w, c)
    with pytest.raises(ValueError, match="const"):
        sparse_kd_loss(s, ids, w, c[:, :5])
    with pytest.raises(ValueError, match="pass labels"):
        sparse_kd_loss(s, ids, w, c, beta=0.5)
