"""Counter-based weight noise of the numba backend: Philox known answers, statistics,
per-channel scale, reproducibility, independence, thread-count invariance, and the
agreement in distribution with the torch backend (torch.randn)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from afm import reference as ref  # noqa: E402
from afm.config import WeightNoiseKind  # noqa: E402
from afm.kernels import philox  # noqa: E402
from afm.kernels.numba_chains import NumbaElementwise as NB  # noqa: E402
from afm.kernels.torch_chains import TorchElementwise as TE  # noqa: E402
from afm.presets import get_preset  # noqa: E402


def test_philox4x32_10_known_answers():
    # Random123's kat_vectors for philox4x32_10 with counter (c0, c1, 0, 0)
    zero = philox._philox(np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0))
    assert [hex(int(v)) for v in zero] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


def _ks_normal(z: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of ``z`` to N(0, 1)."""
    z = np.sort(z.astype(np.float64))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    n = len(z)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def test_stream_is_standard_normal():
    n = 1 << 20
    z = philox.normal_stream(n, 1234)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 0.05  # kurtosis of a normal
    assert abs((z**3).mean()) < 0.02
    assert _ks_normal(z[: 1 << 17]) < 1.63 / math.sqrt(1 << 17)  # KS at 1 %
    assert np.abs(z).max() < 5.8  # 24-bit radius: |ξ| ≤ 5.77


def test_reproducible_independent_and_the_same_for_any_thread_count():
    n = (1 << 18) + 123  # past the parallel threshold, a partial last chunk
    a = philox.normal_stream(n, 7, threads=1)
    np.testing.assert_array_equal(a, philox.normal_stream(n, 7, threads=2))
    np.testing.assert_array_equal(a, philox.normal_stream(n, 7, threads=3))
    b = philox.normal_stream(n, 8)  # the next step's seed
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)
    # no correlation between neighbours inside one stream (pairs, blocks, chunks)
    for lag in (1, 2, 4, philox.CHUNK // 2, philox.CHUNK):
        assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < 5 / math.sqrt(n)
    # the cos and sin halves of a Box-Muller pair are uncorrelated in square too
    half = philox.CHUNK // 2
    cos, sin = a[:half], a[half : 2 * half]
    assert abs(np.corrcoef(cos**2, sin**2)[0, 1]) < 5 / math.sqrt(half)


def _noise_case(tiles: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=g) * 0.05
    w[:, :] *= torch.linspace(0.2, 2.0, 64)[:, None]  # rows of different scale
    bounds = ref.tile_bounds(1024, 256 if tiles else None)
    a = ref.weight_abs_max(w, bounds)
    return w, a, bounds


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("kind", list(WeightNoiseKind))
def test_per_channel_scale_matches_the_torch_backend_in_distribution(tiles, kind):
    w, a, bounds = _noise_case(tiles)
    std = 0.05
    ours = NB.noisy_weight(w, a, bounds, kind, std, None, 99) - w
    theirs = ref.noisy_weight(w, a, bounds, kind, std, torch.Generator().manual_seed(99)) - w
    assert not torch.equal(ours, theirs)  # other numbers ...
    if kind is WeightNoiseKind.ADD_GAUSS_PER_CHANNEL:
        scale = a
    else:
        scale = a.amax(dim=1, keepdim=True).expand_as(a)
    for s, (lo, hi) in enumerate(bounds):  # ... the same distribution per row and tile
        want = std * scale[s]
        for noise in (ours, theirs):
            z = noise[:, lo:hi] / want[:, None]
            n = z.shape[1]
            assert (z.mean(1).abs() < 5 / math.sqrt(n)).all()
            assert ((z.std(1) - 1).abs() < 5 * math.sqrt(2 / n)).all()
    z_ours = (ours[:, bounds[0][0] : bounds[0][1]] / (std * scale[0])[:, None]).flatten()
    assert _ks_normal(z_ours.numpy()) < 1.63 / math.sqrt(z_ours.numel())


def test_layer_noise_is_seeded_per_call_and_the_backward_sees_it():
    config = get_preset("afm-paper")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, generator=g)
    w = (torch.randn(48, 128, generator=g) * 0.05).requires_grad_(True)
    r = torch.ones(1) * 3.0
    outs = {}
    for elementwise in (TE, NB):
        for seed in (5, 5, 6):
            y = ref.analog_linear(
                x, w, None, r, config, training=True, seed=seed, elementwise=elementwise
            )
            outs.setdefault(elementwise, []).append(y.detach())
    for ys in outs.values():
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)  # same seed, same noise
        assert not torch.equal(ys[0], ys[2])  # next step: new noise
    # numba vs torch: different noise of the same size
    d_nb = (outs[NB][0] - outs[NB][2]).std()
    d_te = (outs[TE][0] - outs[TE][2]).std()
    assert 0.8 < (d_nb / d_te).item() < 1.25
    # the backward uses the forward's noisy weight: dL/dx = g · W_noisy (no clipping here)
    xg = x.clone().requires_grad_(True)
    cfg = replace(config, output=replace(config.output, bits=None, bound=None))
    y = ref.analog_linear(xg, w, None, r * 100, cfg, training=True, seed=5, elementwise=NB)
    gy = torch.randn_like(y)
    y.backward(gy)
    a = ref.weight_abs_max(w, ref.tile_bounds(128, None))
    w_noisy = NB.noisy_weight(w.detach(), a, ref.tile_bounds(128, None),
                              cfg.weight_noise.kind, cfg.weight_noise.std, None, 5)  # fmt: skip
    torch.testing.assert_close(xg.grad, gy @ w_noisy, rtol=1e-4, atol=1e-5)


def test_the_weight_storage_stays_resizable():
    """FSDP frees and re-gathers an unsharded parameter's storage between forwards:
    the numba noise must not pin it (``Tensor.numpy()`` would)."""
    from afm.config import WeightNoiseKind
    from afm.kernels.numba_chains import NumbaElementwise

    w = torch.randn(8, 16)
    a = w.abs().amax(dim=1).reshape(1, 8)
    noisy = NumbaElementwise.noisy_weight(
        w, a, [(0, 16)], WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, 0.1, None, 7
    )
    assert noisy.shape == w.shape and not torch.equal(noisy, w)
    w.untyped_storage().resize_(0)  # raises "not resizable" when the storage is pinned
