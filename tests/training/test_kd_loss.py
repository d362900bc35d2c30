"""KD loss: chunked custom autograd vs the naive reference; memory; labels; validation."""

from __future__ import annotations

import pytest
import torch

from afm.training.kd_loss import causal_lm_labels, kd_loss, naive_kd_loss, peak_cpu_memory


def _inputs(b=2, length=9, v=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(b, length, v, generator=g)).to(dtype).requires_grad_(True)
    t = 3 * torch.randn(b, length, v, generator=g)
    ids = torch.randint(0, v, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 6:] = 0
    return s, t, ids, mask


@pytest.mark.parametrize("beta,temperature", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.5), (0.0, 1.0)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_matches_naive_loss_and_gradient(beta, temperature, chunk):
    s, t, ids, mask = _inputs()
    labels = causal_lm_labels(ids, mask)
    ref = naive_kd_loss(s, t, mask=mask, labels=labels, temperature=temperature, beta=beta)
    (g_ref,) = torch.autograd.grad(ref.loss, s)
    out = kd_loss(
        s, t, mask=mask, labels=labels, temperature=temperature, beta=beta, chunk_size=chunk
    )
    (g,) = torch.autograd.grad(out.loss, s)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    if beta > 0:
        torch.testing.assert_close(out.kl, ref.kl, rtol=1e-5, atol=1e-6)
    if beta < 1:
        torch.testing.assert_close(out.lm, ref.lm, rtol=1e-5, atol=1e-6)


def test_inplace_backward_gives_the_same_gradient_upstream():
    s0, t, ids, mask = _inputs()
    w = torch.randn(37, 37, requires_grad=True)
    grads = []
    for inplace in (False, True):
        logits = s0.detach() @ w  # a Linear-like producer that does not save its output
        out = kd_loss(logits, t, mask=mask, chunk_size=5, inplace_backward=inplace)
        (gw,) = torch.autograd.grad(out.loss, w)
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1])


def test_inplace_backward_fails_loudly_when_logits_are_saved_elsewhere():
    s, t, _, mask = _inputs()
    logits = torch.tanh(s)  # tanh saves its output for backward
    out = kd_loss(logits, t, mask=mask, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_padding_is_ignored():
    s, t, ids, mask = _inputs()
    out1 = kd_loss(s, t, mask=mask)
    s2, t2 = s.detach().clone(), t.clone()
    s2[1, 6:] = 1e3 * torch.randn_like(s2[1, 6:])  # garbage on padded positions
    t2[1, 6:] = -1e3
    out2 = kd_loss(s2.requires_grad_(True), t2, mask=mask)
    torch.testing.assert_close(out1.loss, out2.loss)
    (g,) = torch.autograd.grad(out2.loss, s2)
    assert torch.count_nonzero(g[1, 6:]) == 0


def test_bf16_logits_get_bf16_gradients_close_to_fp32():
    s, t, _, mask = _inputs(dtype=torch.bfloat16)
    out = kd_loss(s, t, mask=mask, chunk_size=3)
    (g,) = torch.autograd.grad(out.loss, s)
    assert g.dtype == torch.bfloat16
    ref = naive_kd_loss(s.float(), t, mask=mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_identical_distributions_give_zero_kl():
    s, _, _, mask = _inputs()
    out = kd_loss(s, s.detach().clone(), mask=mask, temperature=2.0)
    assert abs(out.loss.item()) < 1e-5


def test_causal_lm_labels_shift_and_mask():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = causal_lm_labels(ids, mask)
    assert labels.tolist() == [[6, 7, 8, -100], [2, 3, -100, -100]]


def test_validation_errors():
    s, t, _, _ = _inputs()
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(s, t[:, :-1])
    with pytest.raises(ValueError, match="pass labels"):
        kd_loss(s, t, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, temperature=0)


def _peaks(n_tokens: int, vocab: int, chunk: int) -> tuple[int, int, int]:
    """Peak bytes allocated by the naive loss, the chunked loss, and the in-place variant."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n_tokens, vocab, generator=g).requires_grad_(True)
    t = torch.randn(n_tokens, vocab, generator=g)
    p_naive = peak_cpu_memory(lambda: naive_kd_loss(s, t).loss.backward())
    s.grad = None
    p_chunk = peak_cpu_memory(lambda: kd_loss(s, t, chunk_size=chunk).loss.backward())
    s.grad = None
    logits = s.detach().clone().requires_grad_(True)  # stands for the model's logits
    p_inplace = peak_cpu_memory(
        lambda: kd_loss(logits, t, chunk_size=chunk, inplace_backward=True).loss.backward()
    )
    return p_naive, p_chunk, p_inplace


def test_peak_memory_small():
    p_naive, p_chunk, p_inplace = _peaks(1024, 4096, 128)
    assert p_naive >= 4 * 1024 * 4096 * 4  # several fp32 tokens × vocab tensors
    assert p_chunk <= p_naive / 3  # only the gradient (1×) + one chunk
    assert p_inplace <= p_naive / 4


@pytest.mark.slow
def test_peak_memory_vocab_32k_2x2048_tokens():
    p_naive, p_chunk, p_inplace = _peaks(2 * 2048, 32000, 256)
    assert p_inplace <= p_naive / 4
    assert p_chunk <= p_naive / 3
