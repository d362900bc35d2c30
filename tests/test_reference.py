"""The torch reference against hand-computed cases and the spec's formulas."""

import math

import pytest
import torch

from afm import reference as ref
from afm.config import (
    AnalogConfig,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightNoiseKind,
)
from afm.kernels import dispatch as ops
from afm.kernels import torch_chains as chains
from afm.kernels.torch_chains import TorchElementwise


def cfg(**kw):
    base = dict(
        input=InputQuantConfig(bits=8, learn_ranges=True, decay=0.0),
        output=OutputQuantConfig(bits=8, bound=14.0),
        clip=ClipConfig(ClipKind.GAUSSIAN_PER_CHANNEL, 2.5),
    )
    base.update(kw)
    return AnalogConfig(**base)


def spec_forward(x, w, b, r, config):
    """The spec written out literally (no integer-grid tricks), noise off."""
    bounds = ref.tile_bounds(w.shape[1], config.max_input_size)
    out = 0
    for s, (lo, hi) in enumerate(bounds):
        xs = ref.quantize_input(x[..., lo:hi], r[s], config.input.bits)
        ys = xs @ w[:, lo:hi].t()
        if config.output.bits is not None:
            a = w[:, lo:hi].abs().amax(dim=1)
            if config.clip.kind is not ClipKind.GAUSSIAN_PER_CHANNEL:
                a = a.amax()
            ys = ref.quantize_output(ys, config.output.bound * r[s] * a, config.output.bits)
        out = out + ys
    return out + (b if b is not None else 0)


def test_tile_bounds_balanced():
    assert ref.tile_bounds(257, 128) == [(0, 86), (86, 172), (172, 257)]
    assert ref.tile_bounds(512, 512) == [(0, 512)]
    assert ref.tile_bounds(10, None) == [(0, 10)]
    assert ref.tile_bounds(10, 3) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_quantize_input_hand_case():
    # r = 1, 2 bits -> n = 2 steps, Δ = 1: levels -1, 0, 1; ties round to even.
    x = torch.tensor([-2.0, -0.6, 0.2, 0.5, 0.7, 3.0])
    assert ref.quantize_input(x, 1.0, 2).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]
    # 8 bits: Δ = 2r/254
    r = 2.54
    x = torch.tensor([0.0101, 0.03, -5.0])
    assert torch.allclose(ref.quantize_input(x, r, 8), torch.tensor([0.02, 0.04, -2.54]))
    # bits None: clip only
    assert ref.quantize_input(torch.tensor([0.123, 9.0]), 1.0, None).tolist() == pytest.approx(
        [0.123, 1.0]
    )


def test_quantize_output_hand_case():
    # B = 1, 3 bits -> n = 6, Δ = 1/3
    y = torch.tensor([0.1, 0.2, 0.5, -0.9, 4.0])
    out = ref.quantize_output(y, torch.tensor(1.0), 3)
    assert torch.allclose(out, torch.tensor([0.0, 1 / 3, 2 / 3, -1.0, 1.0]))


def test_layer_matches_spec_written_out():
    torch.manual_seed(0)
    w = torch.randn(7, 20)
    b = torch.randn(7)
    x = torch.randn(5, 20) * 2
    config = cfg(max_input_size=8)
    r = torch.tensor([1.5, 0.7, 3.0])
    out = ref.analog_linear(x, w, b, r, config, training=False)
    expect = spec_forward(x, w, b, r, config)
    step = (2 * 14.0 * r.max() * w.abs().max() / 254).item()
    diff = (out - expect).abs()
    assert (diff > 1e-4).float().mean() < 0.01  # rounding ties only
    assert diff.max() <= step * 1.01


def test_output_quantization_per_tile_when_clip_is_per_layer():
    torch.manual_seed(1)
    w, x = torch.randn(6, 16), torch.randn(4, 16)
    config = cfg(clip=ClipConfig(ClipKind.GAUSSIAN, 3.0), max_input_size=None)
    r = torch.tensor([2.0])
    out = ref.analog_linear(x, w, None, r, config, training=False)
    assert torch.allclose(out, spec_forward(x, w, None, r, config), atol=1e-5)


def test_ideal_config_is_nn_linear():
    from afm.presets import get_preset

    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    x = torch.randn(3, 4, 12)
    out = ref.analog_linear(
        x, lin.weight, lin.bias, torch.ones(1), get_preset("ideal"), training=True
    )
    assert torch.equal(out, lin(x))


def _elementwise_chains():
    if not ops.numba_available():  # numba is an optional extra
        return [TorchElementwise]
    from afm.kernels.numba_chains import NumbaElementwise

    return [TorchElementwise, NumbaElementwise]


@pytest.mark.parametrize("elementwise", _elementwise_chains(), ids=lambda c: c.__name__)
def test_gradients_follow_the_spec(elementwise):
    torch.manual_seed(0)
    config = cfg(
        max_input_size=6,
        input=InputQuantConfig(bits=8, decay=0.01, min_fraction=0.5),
        output=OutputQuantConfig(bits=8, bound=2.0),
    )
    x = (torch.randn(9, 12) * 1.5).requires_grad_()
    w = torch.randn(4, 12).requires_grad_()
    b = torch.randn(4).requires_grad_()
    r = torch.tensor([1.0, 0.8]).requires_grad_()
    out = ref.analog_linear(x, w, b, r, config, training=False, elementwise=elementwise)
    g = torch.randn_like(out)
    out.backward(g)

    # Expected, written from the spec per tile.
    gx = torch.zeros_like(x)
    gw = torch.zeros_like(w)
    gr = torch.zeros(2)
    for s, (lo, hi) in enumerate(ref.tile_bounds(12, 6)):
        xs, ws = x.detach()[:, lo:hi], w.detach()[:, lo:hi]
        xq = ref.quantize_input(xs, r[s].detach(), 8)
        ys = xq @ ws.t()
        a = ws.abs().amax(dim=1)
        bound = 2.0 * r[s].detach() * a
        delta = 2 * bound / 254
        past = (torch.round(ys / delta) * delta).abs() > bound  # no gradient past ±B
        gs = g.masked_fill(past, 0)
        gw[:, lo:hi] = gs.t() @ xq
        gq = gs @ ws
        clipped = xs.abs() >= r[s].detach()
        gx[:, lo:hi] = gq.masked_fill(clipped, 0)
        rv = r[s].detach()
        pairs = list(zip(gq.flatten().tolist(), xs.flatten().tolist(), strict=True))
        term = sum(min(v, 0.0) for v, xv in pairs if xv >= rv)
        term -= sum(max(v, 0.0) for v, xv in pairs if xv <= -rv)
        frac_not_clipped = 1 - clipped.float().mean().item()
        gr[s] = rv * term + (0.01 * rv if frac_not_clipped > 0.5 else 0.0)
    assert torch.allclose(x.grad, gx, atol=1e-5)
    assert torch.allclose(w.grad, gw, atol=1e-4)
    assert torch.allclose(b.grad, g.sum(0))
    assert torch.allclose(r.grad, gr, atol=1e-4)
    # The bound bit: something did saturate, so the mask mattered.
    assert any(
        (
            ref.quantize_output(
                x.detach()[:, :6] @ w.detach()[:, :6].t(),
                2.0 * r[0].detach() * w.detach()[:, :6].abs().amax(1),
                8,
            ).abs()
            >= 2.0 * r[0].detach() * w.detach()[:, :6].abs().amax(1) * 0.999
        ).flatten()
    )


def test_row_blocks_change_nothing_but_the_range_sum_order(monkeypatch):
    # The torch chains run over row blocks on CPU; tiny blocks must give the same layer.
    config = cfg(max_input_size=40, input=InputQuantConfig(bits=8, decay=0.01))
    results = []
    for block in (1 << 30, 37):
        monkeypatch.setattr(chains, "_BLOCK_ELEMENTS", block)
        assert len(chains._row_blocks(60, 40, torch.device("cpu"))) == (1 if block > 2400 else 60)
        torch.manual_seed(0)
        x = (torch.randn(60, 100) * 1.5).requires_grad_()
        w = torch.randn(24, 100).requires_grad_()
        r = torch.tensor([1.0, 0.8, 1.2]).requires_grad_()
        out = ref.analog_linear(x, w, None, r, config, training=True, seed=5)
        out.backward(torch.randn(60, 24, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), x.grad, w.grad, r.grad))
    for got, want in zip(results[1][:3], results[0][:3], strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(results[1][3], results[0][3], rtol=1e-6, atol=1e-5)


def test_clip_sign_is_exact_at_the_range_edges():
    r = torch.tensor(0.75)
    below = torch.nextafter(r, torch.tensor(0.0)).item()
    x = torch.tensor([[0.75, -0.75, below, -below, 3.0, -3.0, 0.0, 0.1]])
    xq, _, clip = TorchElementwise.quantize_static_input(x, r, 2 * r / 254, save=True)
    assert clip.tolist() == [[1, -1, 0, 0, 1, -1, 0, 0]]  # x ≥ r and x ≤ -r, not |x| > r
    assert xq.tolist() == [[127.0, -127.0, 127.0, -127.0, 127.0, -127.0, 0.0, 17.0]]


def test_input_range_decay_switches_on_when_little_clips():
    x = torch.full((100,), 0.1)
    x[0] = 5.0  # 1 % clipped
    g = torch.zeros(100)
    r = torch.tensor(1.0)
    assert ref.input_range_grad(x, g, r, 0.01, 0.95).item() == pytest.approx(0.01)
    x[:10] = 5.0  # 10 % clipped: decay off
    assert ref.input_range_grad(x, g, r, 0.01, 0.95).item() == 0.0
    g[:10] = -2.0  # clipped inputs want to be larger -> negative grad -> r grows
    assert ref.input_range_grad(x, g, r, 0.01, 0.95).item() == pytest.approx(-20.0)


def noise_cfg(kind, std, out_std=0.0, per_channel=True, m=None):
    return AnalogConfig(
        input=InputQuantConfig(bits=None, learn_ranges=True, decay=0.0),
        output=OutputQuantConfig(bits=None, bound=None),
        weight_noise=WeightNoiseConfig(kind, std),
        output_noise=OutputNoiseConfig(out_std, per_channel),
        max_input_size=m,
    )


@pytest.mark.parametrize("kind", [WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, WeightNoiseKind.ADD_GAUSS])
def test_weight_noise_statistics(kind):
    torch.manual_seed(0)
    n, k = 256, 200
    w = torch.randn(n, k) * torch.linspace(0.1, 2.0, n).unsqueeze(1)
    x = torch.eye(k)  # each output row of y - y_clean is one column of the noise
    r = torch.full((2,), 1e6)
    config = noise_cfg(kind, 0.05, m=100)
    clean = x @ w.t()
    noisy = ref.analog_linear(x, w, None, r, config, training=True, seed=3)
    diff = (noisy - clean).t()  # [N, K]
    for lo, hi in ((0, 100), (100, 200)):
        a = w[:, lo:hi].abs().amax(dim=1, keepdim=True)
        if kind is WeightNoiseKind.ADD_GAUSS:
            a = a.amax()
        z = diff[:, lo:hi] / a
        assert z.std().item() == pytest.approx(0.05, rel=0.03)
        assert abs(z.mean().item()) < 0.002
    # same seed ⇒ same output; different seed ⇒ different; eval ⇒ no noise
    again = ref.analog_linear(x, w, None, r, config, training=True, seed=3)
    assert torch.equal(noisy, again)
    other = ref.analog_linear(x, w, None, r, config, training=True, seed=4)
    assert not torch.equal(noisy, other)
    assert torch.allclose(
        ref.analog_linear(x, w, None, r, config, training=False), clean, atol=1e-5
    )


@pytest.mark.parametrize("per_channel", [True, False])
def test_output_noise_statistics_per_tile(per_channel):
    torch.manual_seed(0)
    w = torch.randn(64, 90) * torch.linspace(0.2, 1.0, 64).unsqueeze(1)
    x = torch.randn(4000, 90) * 0.1
    r = torch.tensor([1.0, 2.0])
    config = AnalogConfig(
        input=InputQuantConfig(bits=None, learn_ranges=True, decay=0.0),
        output=OutputQuantConfig(bits=None, bound=None),
        output_noise=OutputNoiseConfig(0.04, per_channel),
        max_input_size=45,
    )
    clean = ref.analog_linear(x, w, None, r, config, training=False)
    noisy = ref.analog_linear(x, w, None, r, config, training=True, seed=1)
    diff = noisy - clean
    # Each tile adds its own noise σ_o·r_s·a_s: the variances add.
    var = 0
    for s, (lo, hi) in enumerate(ref.tile_bounds(90, 45)):
        a = w[:, lo:hi].abs().amax(dim=1)
        if not per_channel:
            a = a.amax().expand(64)
        var = var + (0.04 * r[s] * a) ** 2
    measured = diff.std(dim=0)
    assert torch.allclose(measured, var.sqrt(), rtol=0.06)


def test_dynamic_input_mode_uses_per_token_absmax():
    config = AnalogConfig(
        input=InputQuantConfig(bits=2, learn_ranges=False, dynamic=True),
        output=OutputQuantConfig(bits=None, bound=None),
    )
    x = torch.tensor([[1.0, 0.4, -0.6], [10.0, 2.0, 6.0]])
    w = torch.eye(3)
    out = ref.analog_linear(x, w, None, torch.ones(1), config, training=False)
    # r = per-token abs-max; 2 bits -> levels -r, 0, r
    assert out.tolist() == [[1.0, 0.0, -1.0], [10.0, 0.0, 10.0]]


def test_weight_is_never_mutated_and_dtypes():
    torch.manual_seed(0)
    config = cfg(weight_noise=WeightNoiseConfig("add_gauss_per_channel", 0.03), max_input_size=16)
    w32 = torch.randn(8, 40)
    x32 = torch.randn(6, 40)
    r = torch.tensor([3.0, 3.0, 3.0])
    base = ref.analog_linear(x32, w32, None, r, config, training=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = w32.to(dtype).detach().clone().requires_grad_()
        before = w.detach().clone()
        x = x32.to(dtype).detach().clone().requires_grad_()
        out = ref.analog_linear(
            x, w, None, r.clone().requires_grad_(), config, training=True, seed=0
        )
        assert out.dtype == dtype
        out.float().sum().backward()
        assert torch.equal(w.detach(), before)
        assert x.grad.dtype == dtype and w.grad.dtype == dtype
        if dtype is not torch.float32:
            evald = ref.analog_linear(x.detach(), w.detach(), None, r, config, training=False)
            # half precision differs from fp32 by at most a few ADC steps
            step = 2 * 14 * 3.0 * w32.abs().max().item() / 254
            assert (evald.float() - base).abs().max().item() < 4 * step


def test_fake_quantize_weight_rtn():
    w = torch.tensor([[0.7, -0.33, 0.1, 0.0], [1.4, 0.2, -0.05, -0.66]], requires_grad=True)
    q = ref.fake_quantize_weight(w, bits=4)
    assert torch.allclose(q[0], torch.tensor([0.7, -0.3, 0.1, 0.0]))
    assert torch.allclose(q[1], torch.tensor([1.4, 0.2, 0.0, -0.6]))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    g = ref.fake_quantize_weight(w.detach(), bits=4, group_size=2)
    assert torch.allclose(g[0, 2:], torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="group_size=3"):
        ref.fake_quantize_weight(w.detach(), bits=4, group_size=3)


def test_clip_weight_per_channel_and_per_layer():
    torch.manual_seed(0)
    w = torch.randn(5, 1000)
    w[0, 0] = 50.0
    c = ref.clip_weight_(w.clone(), ClipKind.GAUSSIAN_PER_CHANNEL, 2.5)
    std = w.std(dim=1, keepdim=True)
    assert torch.all(c.abs() <= 2.5 * std + 1e-6)
    assert c[0, 0].item() == pytest.approx(2.5 * std[0, 0].item())
    c2 = ref.clip_weight_(w.clone(), ClipKind.GAUSSIAN, 3.0)
    assert c2.abs().max().item() == pytest.approx(3.0 * w.std().item())


def test_clip_weight_fast_row_std_matches_torch_std_and_keeps_dtype():
    torch.manual_seed(0)
    w = torch.randn(7, 333) * 0.02 + 5.0  # a large row mean: the two-pass std stays exact
    bound = 2.0 * w.std(dim=1, keepdim=True)
    c = ref.clip_weight_(w.clone(), ClipKind.GAUSSIAN_PER_CHANNEL, 2.0)
    torch.testing.assert_close(c, torch.clamp(w, -bound, bound), rtol=0, atol=1e-6)
    wb = w.to(torch.bfloat16)
    cb = ref.clip_weight_(wb.clone(), ClipKind.GAUSSIAN_PER_CHANNEL, 2.0)
    assert cb.dtype == torch.bfloat16
    bb = 2.0 * wb.float().std(dim=1, keepdim=True)
    torch.testing.assert_close(cb, torch.clamp(wb.float(), -bb, bb).to(torch.bfloat16))


def test_init_range_update_running_mean():
    x1, x2 = torch.randn(1000) * 2, torch.randn(1000) * 4
    r = torch.tensor(3.0)
    r = ref.init_range_update(r, x1, 0, 18.0)
    assert r.item() == pytest.approx(18.0 * x1.std().item(), rel=1e-5)
    r = ref.init_range_update(r, x2, 1, 18.0)
    assert r.item() == pytest.approx(9.0 * (x1.std() + x2.std()).item(), rel=1e-5)
    assert math.isfinite(ref.init_range_update(r, torch.zeros(10), 2, 18.0).item())
