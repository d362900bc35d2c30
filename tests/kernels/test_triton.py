"""The fused Triton kernels against the torch reference (CPU, Triton interpreter).

The kernels run on CPU tensors under ``TRITON_INTERPRET=1``.  Triton decides
whether a ``@triton.jit`` function (its own ``tl.randn`` included) is interpreted
when the function is defined, i.e. when triton and ``afm.triton_kernels`` are
imported.  So the variable is set here before importing either.  If another test
module imported triton first without it, this process cannot interpret the kernels:
then every test here is skipped and ``test_suite_in_subprocess`` runs this file in
a fresh interpreter with ``TRITON_INTERPRET=1`` instead.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'afm[triton]')")

from afm import reference  # noqa: E402
from afm.analog.layers import AnalogLinear  # noqa: E402
from afm.config import (  # noqa: E402
    AnalogConfig,
    Backend,
    ClipConfig,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightQuantConfig,
)


def _triton_interpreted() -> bool:
    """Whether triton's own jit functions were built for the interpreter."""
    import triton.language.random as tl_random
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl_random.randn, InterpretedFunction)


IN_PROCESS = _triton_interpreted()


def _kernel_modules():
    from afm.triton_kernels import kernels

    if not kernels.INTERPRET:  # imported earlier without the variable, after triton
        os.environ["TRITON_INTERPRET"] = "1"
        kernels = importlib.reload(kernels)
    from afm.triton_kernels import analog_linear as launcher

    assert kernels.INTERPRET
    return kernels, launcher


KERNELS, LAUNCHER = _kernel_modules() if IN_PROCESS else (None, None)


@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    if not IN_PROCESS and request.node.originalname != "test_suite_in_subprocess":
        pytest.skip("triton was imported without TRITON_INTERPRET=1: run by the subprocess test")


def test_suite_in_subprocess():
    """Runs this file in a fresh interpreter when this process cannot interpret kernels."""
    if IN_PROCESS:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


PER_CHANNEL = ClipConfig(kind="gaussian_per_channel")
PER_TILE = ClipConfig(kind="gaussian")


@pytest.fixture
def blocks(monkeypatch):
    """Set the interpreter's fixed block sizes for one test."""

    def set_blocks(bm: int, bn: int, bk: int, group_m: int = 2) -> None:
        monkeypatch.setattr(
            KERNELS,
            "INTERPRET_CONFIG",
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        )

    return set_blocks


def _data(x_shape, n, dtype=torch.float32, seed=0, w_scale=0.08):
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=gen)
    w = torch.randn(n, k, generator=gen) * w_scale
    b = torch.randn(n, generator=gen) * 0.1
    return x.to(dtype), w.to(dtype), b.to(dtype)


def _ranges(cfg: AnalogConfig, k: int, value: float = 2.0) -> torch.Tensor:
    s = cfg.num_tiles(k)
    return torch.linspace(value * 0.8, value * 1.2, s, dtype=torch.float32)


def _adc_step_out(cfg: AnalogConfig, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor):
    """One ADC step in output units per element (the largest over tiles), or None."""
    if cfg.output.bits is None:
        return None
    bounds = reference.tile_bounds(w.shape[1], cfg.max_input_size)
    a = reference.weight_abs_max(w.float(), bounds)  # [S, N]
    if not cfg.clip.per_channel:
        a = a.amax(dim=1, keepdim=True).expand_as(a)
    n_out = 2**cfg.output.bits - 2
    x2 = x.reshape(-1, x.shape[-1]).float()
    steps = []
    for s, (lo, hi) in enumerate(bounds):
        if cfg.input.dynamic:
            r_s = x2[:, lo:hi].abs().amax(dim=1, keepdim=True)  # [M, 1]
        else:
            r_s = r[s].reshape(1, 1)
        steps.append(2 * cfg.output.bound * a[s].reshape(1, -1) * r_s / n_out)
    step = torch.stack([st.expand(x2.shape[0], w.shape[0]) for st in steps]).amax(0)
    return step.reshape(*x.shape[:-1], w.shape[0])


def _assert_adc_close(y, y_ref, step, *, rtol=1e-5, atol=1e-5, max_frac=0.01):
    """Equal to ``rtol/atol`` except on at most ``max_frac`` of the elements, which may
    differ by at most one ADC step (rounding ties of differently ordered fp32 sums)."""
    y, y_ref = y.float(), y_ref.float()
    diff = (y - y_ref).abs()
    tol = atol + rtol * y_ref.abs()
    off = diff > tol
    frac = off.float().mean().item()
    assert frac <= max_frac, f"{frac:.4f} of the outputs differ (max diff {diff.max():.3g})"
    if off.any():
        assert step is not None, f"outputs differ without an ADC: max diff {diff.max():.3g}"
        excess = diff - (step.float() * 1.001 + tol)
        assert (excess[off] <= 0).all(), f"a difference exceeds one ADC step: {excess.max():.3g}"


def _run(fn, x, w, b, r, cfg, *, training, seed, grad_out):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    r = r.clone().requires_grad_(cfg.input.uses_range)
    y = fn(x, w, b, r, cfg, training=training, seed=seed)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad, r.grad


# --------------------------------------------------------------------------- noise off
CASES = {
    # name: (config, x shape, N, interpreter blocks (BM, BN, BK))
    "ragged-tiles64": (AnalogConfig(max_input_size=64, clip=PER_CHANNEL), (3, 37, 129), 48, None),
    "ragged-small-blocks": (
        AnalogConfig(max_input_size=64, clip=PER_CHANNEL),
        (3, 37, 129),
        48,
        (64, 32, 16),
    ),
    "one-tile-per-tile-adc": (AnalogConfig(clip=PER_TILE), (50, 100), 40, (32, 32, 32)),
    "tiles-unbalanced-257": (
        AnalogConfig(max_input_size=128, clip=PER_CHANNEL),
        (20, 257),
        24,
        None,
    ),
    "dynamic": (
        AnalogConfig(
            max_input_size=64,
            input=InputQuantConfig(learn_ranges=False, dynamic=True),
            clip=PER_CHANNEL,
        ),
        (2, 21, 129),
        40,
        None,
    ),
    "clip-only": (
        AnalogConfig(
            max_input_size=50,
            input=InputQuantConfig(bits=None),
            output=OutputQuantConfig(bits=None, bound=None),
        ),
        (33, 120),
        24,
        None,
    ),
    "in-quant-no-adc": (
        AnalogConfig(max_input_size=64, output=OutputQuantConfig(bits=None, bound=None)),
        (33, 129),
        24,
        None,
    ),
    "decode-one-token": (AnalogConfig(max_input_size=64, clip=PER_CHANNEL), (1, 1, 129), 48, None),
    "weight-quant-4bit": (
        AnalogConfig(max_input_size=64, clip=PER_CHANNEL, weight_quant=WeightQuantConfig(bits=4)),
        (17, 128),
        32,
        None,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_noise_off_matches_reference(name, blocks):
    cfg, x_shape, n, blk = CASES[name]
    if blk is not None:
        blocks(*blk)
    x, w, b = _data(x_shape, n)
    r = _ranges(cfg, x_shape[-1])
    g = torch.randn(*x_shape[:-1], n, generator=torch.Generator().manual_seed(1))
    got = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g
    )
    ref = _run(reference.analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g)
    w_eff = w if cfg.weight_quant.bits is None else reference.fake_quantize_weight(w, 4)
    _assert_adc_close(got[0], ref[0], _adc_step_out(cfg, x, w_eff, r))
    # Gradients do not depend on output values, only on the clip and ADC-bound masks;
    # a rare rounding tie at the bound may flip one mask entry.
    for i, what in [(1, "x"), (2, "W"), (3, "bias")]:
        _assert_grad_close(got[i], ref[i], what)
    if cfg.input.uses_range:
        _assert_grad_close(got[4], ref[4], "input range", max_frac=0.0, rtol=1e-4)
    else:
        assert got[4] is None and ref[4] is None


def _assert_grad_close(g, g_ref, what, *, max_frac=0.01, rtol=1e-4, atol=1e-5):
    assert g is not None and g_ref is not None, what
    assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, what
    off = (g.float() - g_ref.float()).abs() > atol + rtol * g_ref.float().abs()
    assert off.float().mean().item() <= max_frac, f"grad of {what}: {off.float().mean():.4f} differ"


def test_saturated_outputs_get_no_gradient():
    """A small ADC bound saturates many outputs: zero gradient past the bound, as the reference."""
    cfg = AnalogConfig(
        max_input_size=64, clip=PER_CHANNEL, output=OutputQuantConfig(bits=8, bound=1.0)
    )
    x, w, b = _data((40, 129), 24)
    r = _ranges(cfg, 129, 3.0)
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    got = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g
    )
    ref = _run(reference.analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g)
    _assert_adc_close(got[0], ref[0], _adc_step_out(cfg, x, w, r))
    loose = cfg.replace(output=OutputQuantConfig(bits=8, bound=1000.0))
    unmasked = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, loose, training=False, seed=None, grad_out=g
    )
    changed = (got[2] != unmasked[2]).float().mean()
    assert changed > 0.2, "the bound saturates too few outputs for this test to mean anything"
    for i, what in [(1, "x"), (2, "W"), (4, "input range")]:
        _assert_grad_close(got[i], ref[i], what)


def test_input_rounding_ties_go_to_even():
    """x exactly on half steps (Δ_in = 1 with r = 127): round half to even like torch.round."""
    cfg = AnalogConfig(output=OutputQuantConfig(bits=None, bound=None))
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, 3.0])
    x = vals.repeat(6, 1)  # [6, 10]
    w = torch.eye(10)
    r = torch.tensor([127.0])
    y = LAUNCHER.triton_analog_linear(x, w, None, r, cfg, training=False, seed=None)
    expected = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -126.0, 0.0, 3.0])
    assert torch.equal(y[0], expected)
    y_ref = reference.analog_linear(x, w, None, r, cfg, training=False, seed=None)
    assert torch.equal(y, y_ref)


# --------------------------------------------------------------------------- noise on
NOISY = {
    "weight-per-channel": AnalogConfig(
        max_input_size=64,
        clip=PER_CHANNEL,
        weight_noise=WeightNoiseConfig(kind="add_gauss_per_channel", std=0.03),
    ),
    "weight-per-tile+output": AnalogConfig(
        max_input_size=64,
        clip=PER_TILE,
        output=OutputQuantConfig(bits=8, bound=10.0),
        weight_noise=WeightNoiseConfig(kind="add_gauss", std=0.067),
        output_noise=OutputNoiseConfig(std=0.04),
    ),
    "output-noise-only-dynamic": AnalogConfig(
        max_input_size=64,
        input=InputQuantConfig(learn_ranges=False, dynamic=True),
        clip=PER_CHANNEL,
        output_noise=OutputNoiseConfig(std=0.04, per_channel=False),
    ),
}


def _noise_std(fn, cfg, x, w, b, r, seeds):
    clean = fn(x, w, b, r, cfg, training=False, seed=None).float()
    diffs = [fn(x, w, b, r, cfg, training=True, seed=s).float() - clean for s in seeds]
    return torch.stack(diffs).std().item()


@pytest.mark.parametrize("name", list(NOISY))
def test_noise_statistics_match_reference(name):
    cfg = NOISY[name]
    x, w, b = _data((96, 129), 64, seed=3)
    r = _ranges(cfg, 129, 2.5)
    fn = LAUNCHER.triton_analog_linear
    y1 = fn(x, w, b, r, cfg, training=True, seed=1234)
    y2 = fn(x, w, b, r, cfg, training=True, seed=1234)
    y3 = fn(x, w, b, r, cfg, training=True, seed=1235)
    assert torch.equal(y1, y2), "the same seed must reproduce the noise exactly"
    assert not torch.equal(y1, y3), "another seed must draw other noise"
    seeds = range(1000, 1006)  # not the data seed: the reference draws ξ with torch.randn
    std_k = _noise_std(fn, cfg, x, w, b, r, seeds)
    std_r = _noise_std(reference.analog_linear, cfg, x, w, b, r, seeds)
    assert std_r > 0
    assert abs(std_k / std_r - 1) < 0.05, f"noise std {std_k:.4g} vs reference {std_r:.4g}"


def test_backward_sees_the_forward_noisy_weight():
    """Without ADC and output noise y = x_q·W̃ᵀ + b exactly; the backward's regenerated W̃
    must reproduce the forward, and grad_x must be g·W̃ (W̃ ≠ W)."""
    cfg = AnalogConfig(
        max_input_size=64,
        output=OutputQuantConfig(bits=None, bound=None),
        weight_noise=WeightNoiseConfig(kind="add_gauss_per_channel", std=0.05),
    )
    x, w, b = _data((40, 129), 32, seed=5)
    x = x.clamp(-1.5, 1.5)  # nothing clipped: grad_x = g·W̃ everywhere
    r = torch.full((3,), 2.0)
    seed = 77
    g = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    y, gx, gw, _, _ = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=True, seed=seed, grad_out=g
    )
    n_tiles, base, extra = LAUNCHER.tile_split(129, 64)
    a = LAUNCHER.tile_absmax(w, n_tiles, base, extra)
    seed_w, _ = LAUNCHER._seeds(seed)
    w_noisy = LAUNCHER.noisy_weight(w, 0.05 * a, seed_w, n_tiles, base, extra)
    assert not torch.equal(w_noisy, w)
    # The forward with the materialised noisy weight and no noise: same output.
    cfg_clean = AnalogConfig(max_input_size=64, output=OutputQuantConfig(bits=None, bound=None))
    y_clean_noisy_w = reference.analog_linear(x, w_noisy, b, r, cfg_clean, training=False)
    torch.testing.assert_close(y, y_clean_noisy_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, g @ w_noisy, rtol=1e-5, atol=1e-5)
    # The weight gradient is straight-through (noise additive): independent of the noise.
    y0, _, gw0, _, _ = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g
    )
    torch.testing.assert_close(gw, gw0, rtol=1e-6, atol=1e-6)


def test_stored_weight_bitwise_unchanged():
    cfg = NOISY["weight-per-tile+output"]
    x, w, b = _data((30, 129), 32)
    layer_w = torch.nn.Parameter(w.clone())
    before = layer_w.detach().clone()
    r = torch.full((3,), 2.0, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    y = LAUNCHER.triton_analog_linear(xr, layer_w, b, r, cfg, training=True, seed=9)
    y.square().sum().backward()
    assert layer_w.grad is not None and xr.grad is not None and r.grad is not None
    assert torch.equal(layer_w.detach(), before)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half inputs: the kernel quantizes in fp32 and accumulates in fp32, so it matches the
    reference run on the (exactly) upcast inputs, up to the final rounding to ``dtype``."""
    cfg = AnalogConfig(max_input_size=64, clip=PER_CHANNEL)
    x, w, b = _data((3, 37, 129), 48, dtype=dtype)
    r = _ranges(cfg, 129)
    y = LAUNCHER.triton_analog_linear(x, w, b, r, cfg, training=False, seed=None)
    assert y.dtype == dtype
    y_ref = reference.analog_linear(x.float(), w.float(), b.float(), r, cfg, training=False)
    eps = torch.finfo(dtype).eps
    _assert_adc_close(y, y_ref, _adc_step_out(cfg, x, w, r), rtol=eps, atol=eps)
    # Gradients: same torch ops as the reference's backward in `dtype`.
    g = torch.randn(3, 37, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(
        LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g
    )
    ref = _run(reference.analog_linear, x, w, b, r, cfg, training=False, seed=None, grad_out=g)
    for i, what in [(1, "x"), (2, "W"), (3, "bias")]:
        _assert_grad_close(got[i], ref[i], what, max_frac=0.03, rtol=2 * eps, atol=eps)
    _assert_grad_close(got[4], ref[4], "input range", max_frac=0.0, rtol=0.05)
    # Noise on in half precision: reproducible, finite.
    noisy = NOISY["weight-per-channel"]
    y1 = LAUNCHER.triton_analog_linear(x, w, b, r, noisy, training=True, seed=5)
    y2 = LAUNCHER.triton_analog_linear(x, w, b, r, noisy, training=True, seed=5)
    assert torch.equal(y1, y2) and torch.isfinite(y1).all() and not torch.equal(y1, y)


# --------------------------------------------------------------------------- the layer
def test_analog_linear_layer_runs_triton_backend(monkeypatch):
    calls = []
    original = LAUNCHER.triton_analog_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(LAUNCHER, "triton_analog_linear", spy)
    cfg = AnalogConfig(backend="triton", max_input_size=64, clip=PER_CHANNEL)
    torch.manual_seed(0)
    layer = AnalogLinear(129, 48, config=cfg)
    ref_layer = AnalogLinear(129, 48, config=cfg.replace(backend=Backend.TORCH))
    ref_layer.load_state_dict(layer.state_dict())
    layer.eval()
    ref_layer.eval()
    assert layer.backend_for(torch.device("cpu")) is Backend.TRITON
    x, _, _ = _data((2, 9, 129), 48)
    y = layer(x)
    assert calls, "the layer did not call the triton launcher"
    y_ref = ref_layer(x)
    _assert_adc_close(y, y_ref, _adc_step_out(cfg, x, layer.weight.detach(), layer.input_range))
    # Training mode with weight noise, through autograd.
    noisy = AnalogConfig(
        backend="triton",
        max_input_size=64,
        clip=PER_CHANNEL,
        weight_noise=WeightNoiseConfig(kind="add_gauss_per_channel", std=0.03),
    )
    layer.set_config(noisy)
    layer.train()
    layer(x).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.input_range.grad is not None


def test_mismatched_dtypes_raise():
    cfg = AnalogConfig()
    x, w, b = _data((4, 16), 8)
    with pytest.raises(TypeError, match="same dtype"):
        LAUNCHER.triton_analog_linear(x.half(), w, None, torch.ones(1), cfg, training=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_kernel_and_materialised_weight_noise_agree(dtype, monkeypatch, blocks):
    """The fused kernel's own weight noise (decode) and the once-materialised noisy weight
    (many tokens) are bitwise the same values, also with K-blocks straddling tiles."""
    blocks(32, 32, 16)
    cfg = NOISY["weight-per-tile+output"]
    x, w, b = _data((2, 19, 129), 40, dtype=dtype)
    r = _ranges(cfg, 129, 2.5)
    outs = []
    for limit in (0, 10**9):
        monkeypatch.setattr(LAUNCHER, "INKERNEL_NOISE_MAX_TOKENS", limit)
        outs.append(LAUNCHER.triton_analog_linear(x, w, b, r, cfg, training=True, seed=42))
    assert torch.equal(outs[0], outs[1])
    clean = LAUNCHER.triton_analog_linear(x, w, b, r, cfg, training=False, seed=None)
    assert not torch.equal(outs[0], clean)


def test_int64_addressing_matches(monkeypatch):
    """The int64 index path (for M·K, N·K or M·N ≥ 2^31) computes the same outputs and
    gradients; its noise is self-consistent (the Philox counters are 64-bit there)."""
    cfg = AnalogConfig(max_input_size=64, clip=PER_CHANNEL)
    x, w, b = _data((2, 19, 129), 40)
    r = _ranges(cfg, 129)
    g = torch.randn(2, 19, 40, generator=torch.Generator().manual_seed(1))
    narrow = _run(LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None,
                  grad_out=g)  # fmt: skip
    monkeypatch.setattr(LAUNCHER, "WIDE_INDEX_FROM", 0)
    wide = _run(LAUNCHER.triton_analog_linear, x, w, b, r, cfg, training=False, seed=None,
                grad_out=g)  # fmt: skip
    for a, c in zip(narrow, wide, strict=True):
        assert torch.equal(a, c)
    noisy = NOISY["weight-per-tile+output"]
    outs = []
    for limit in (0, 10**9):
        monkeypatch.setattr(LAUNCHER, "INKERNEL_NOISE_MAX_TOKENS", limit)
        outs.append(LAUNCHER.triton_analog_linear(x, w, b, r, noisy, training=True, seed=3))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], narrow[0])


# Compiles the kernels for an H100-class GPU (sm_90) with Triton's bundled ptxas, in a
# process without TRITON_INTERPRET: catches what only the compiler rejects (e.g.
# non-constexpr globals) and checks that the main loop's loads are software-pipelined
# (async copies into a multi-stage shared-memory ring) for aligned and ragged tiles
# alike, which fused-kernel speed needs.
_AOT_SCRIPT = r"""
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from afm.triton_kernels import kernels as K

def compile_kernel(fn, values, ptrs, divisible, warps=8, stages=3):
    # Unit strides are specialised to the constant 1 at launch: do the same here.
    values = {**values, **{n: 1 for n in ("stride_xk", "stride_wk", "stride_on")}}
    sig, consts, attrs = {}, {}, {}
    for p in fn.params:
        if p.is_constexpr or (p.name in values and fn is K._analog_fwd_kernel):
            sig[p.name] = "constexpr"
            consts[(p.num,)] = values[p.name]
        else:
            sig[p.name] = ptrs.get(p.name, "i64" if p.name.startswith("seed") else "i32")
            if p.name in divisible:
                attrs[(p.num,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})

DT = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
for dt, mode, wnoise, onoise, adc, aligned in [
    ("bf16", K.IN_QUANT, False, False, True, True),
    ("bf16", K.IN_QUANT, True, True, True, True),
    ("fp16", K.IN_DYNAMIC, False, True, True, False),
    ("bf16", K.IN_CLIP, True, False, False, False),
    ("fp32", K.IN_NONE, True, False, False, True),
]:
    values = dict(N_IN=254, N_OUT=254 if adc else 0, IN_MODE=mode, HAS_ADC=adc,
                  HAS_WNOISE=wnoise, HAS_ONOISE=onoise, HAS_BIAS=True, SAVE_MASK=adc,
                  X_DTYPE=DT[dt], W_DTYPE=DT[dt], DOT_DTYPE=DT[dt],
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", EMULATE_BF16=False,
                  WIDE_IDX=False, ALIGNED=aligned, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                  GROUP_M=8)
    ptrs = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
    ptrs.update({p.name: "*fp32" for p in K._analog_fwd_kernel.params
                 if p.name.endswith("_ptr") and p.name not in ptrs})
    ptrs["sat_ptr"] = "*i32"
    # Launch-time specialisation of a real model's shapes (K a multiple of 16); the
    # tile width only in the aligned case (ragged: e.g. K = 11008 in tiles of 500/501).
    divisible = {"x_ptr", "w_ptr", "b_ptr", "out_ptr", "sat_ptr", "M", "N", "K",
                 "stride_xm", "stride_wn", "stride_om"} | ({"TILE_BASE"} if aligned else set())
    cc = compile_kernel(K._analog_fwd_kernel, values, ptrs, divisible)
    n_async = len(re.findall(r"cp\.async", cc.asm["ptx"]))
    print(dt, mode, "shared", cc.metadata.shared, "cp.async", n_async)
    if dt != "fp32" and (n_async < 16 or cc.metadata.shared < 2 * 32768):
        sys.exit(f"main loop not pipelined: {dt} mode {mode}")
    if (mode >= K.IN_QUANT or adc) and "0f4B400000" not in cc.asm["ptx"]:
        sys.exit("the round-half-even constant 1.5*2^23 was folded away")
compile_kernel(K.tile_absmax_kernel, dict(WIDE_IDX=True, BLOCK_N=32, BLOCK_K=128),
               {"w_ptr": "*bf16", "a_ptr": "*fp32"}, set(), warps=4)
compile_kernel(K.noisy_weight_kernel,
               dict(W_DTYPE=tl.bfloat16, EMULATE_BF16=False, WIDE_IDX=False, BLOCK_N=64,
                    BLOCK_K=64),
               {"w_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16"}, set(), warps=4)
print("AOT-OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_pipeline():
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
