"""The fused CPU kernels (backend "numba") against the torch reference's chains."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from afm import reference as ref  # noqa: E402
from afm.analog.layers import AnalogLinear  # noqa: E402
from afm.config import Backend, InputQuantConfig, OutputQuantConfig  # noqa: E402
from afm.kernels import dispatch as ops  # noqa: E402
from afm.kernels.numba_chains import Marks, SparseADCGrad, _nonzero  # noqa: E402
from afm.kernels.numba_chains import NumbaElementwise as NB  # noqa: E402
from afm.kernels.torch_chains import TorchElementwise  # noqa: E402
from afm.presets import get_preset  # noqa: E402

TE = TorchElementwise


def _edges(r: float) -> torch.Tensor:
    """Values on and next to the clip edges, where the clip sign must be exact."""
    r_t = torch.tensor(r)
    below = torch.nextafter(r_t, torch.tensor(0.0)).item()
    return torch.tensor([r, -r, below, -below, 2 * r, -2 * r, 0.0, r / 3])


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("save", [True, False])
def test_input_kernel_matches_torch_exactly(strided, save):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g) * 1.5
    x[0, :8] = _edges(1.25)
    if strided:  # a tile of a wider input: a non-contiguous view
        x = torch.cat([x, torch.randn(300, 40, generator=g)], dim=1)[:, :96]
    r = torch.tensor(1.25)
    unit = 2 * r / 254
    q_ref, packed_ref, c_ref = TE.quantize_static_input(x, r, unit, save=save)
    q, packed, c = NB.quantize_static_input(x, r, unit, save=save)
    assert packed_ref is None  # the torch chain's backward keeps q itself
    assert torch.equal(q, q_ref)
    if save:
        assert isinstance(c, Marks) and c.count == int(c_ref.count_nonzero())
        assert torch.equal(c.dense(), c_ref)
        assert c.dense()[0, :8].tolist() == [1, -1, 0, 0, 1, -1, 0, 0]
        assert packed.dtype == torch.int8
        assert torch.equal(NB.unpack_input(packed), q_ref)
    else:
        assert c is None and c_ref is None and packed is None


def test_input_kernel_packs_wider_grids_in_int16():
    x = torch.linspace(-3, 3, 999).reshape(9, 111)
    r = torch.tensor(2.0)
    unit = 2 * r / (2**12 - 2)  # 12-bit inputs: grid values up to 2047
    q_ref, _, c_ref = TE.quantize_static_input(x, r, unit, save=True)
    q, packed, c = NB.quantize_static_input(x, r, unit, save=True)
    assert packed.dtype == torch.int16 and packed.abs().max() == 2047
    assert torch.equal(NB.unpack_input(packed), q_ref) and torch.equal(c.dense(), c_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_adc_kernel_matches_torch(accumulate, with_bias):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(257, 80, generator=g) * 40
    step = torch.rand(80, generator=g) * 0.5 + 0.1
    unit = torch.tensor(0.03)
    bias = torch.randn(80, generator=g) if with_bias and not accumulate else None
    acc = torch.randn(257, 80, generator=g) if accumulate else None
    out_ref, m_ref = TE.adc_accumulate(
        y.clone(), step, unit, 254, None if acc is None else acc.clone(), bias, save=True
    )
    out, sat = NB.adc_accumulate(
        y.clone(), step, unit, 254, None if acc is None else acc.clone(), bias, save=True
    )
    assert isinstance(sat, Marks)
    assert torch.equal(sat.dense(), m_ref)
    assert sat.count == int(m_ref.sum()) > 0
    # fp32 rounding of bias + q·scale may differ from torch's fused addcmul by one ulp
    torch.testing.assert_close(out, out_ref, rtol=2e-7, atol=1e-6)
    out_nosave, none = NB.adc_accumulate(
        y.clone(), step, unit, 254, None if acc is None else acc.clone(), bias, save=False
    )
    assert none is None
    assert torch.equal(out_nosave, out)


@pytest.mark.parametrize("share", [0.0, 0.004, 0.4])  # none, a few (indices), many (int8)
def test_clip_grad_kernel_matches_torch(share):
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(300, 96, generator=g)
    signs = torch.randint(0, 2, (300, 96), generator=g).to(torch.int8) * 2 - 1
    clip = torch.where(torch.rand(300, 96, generator=g) < share, signs, 0).to(torch.int8)
    sign = Marks(clip.numpy())
    assert torch.equal(sign.dense(), clip) and sign.count == int((clip != 0).sum())
    assert (sign.flat is not None) == (0 < sign.count <= clip.numel() / 64)
    assert (sign.tensor is not None) == (sign.count > clip.numel() / 64)
    ref_grad = grad.clone()
    total_ref, n_ref = TE.mask_clipped_grad_(ref_grad, clip, count=True)
    for given in (clip, sign):  # a plain int8 tensor, or the kernel's compact form
        grad_nb = grad.clone()
        total, n = NB.mask_clipped_grad_(grad_nb, given, count=True)
        assert torch.equal(grad_nb, ref_grad)
        assert (grad_nb[clip != 0] == 0).all()
        assert int(n) == int(n_ref) == int((clip != 0).sum())
        torch.testing.assert_close(total, total_ref, rtol=1e-5, atol=1e-4)
        assert NB.mask_clipped_grad_(grad.clone(), given, count=False)[1] is None
    # bf16 gradients take the torch chain, with the compact form expanded
    g16_ref, g16_nb = grad.to(torch.bfloat16), grad.to(torch.bfloat16)
    want = TE.mask_clipped_grad_(g16_ref, clip, count=True)
    got = NB.mask_clipped_grad_(g16_nb, sign, count=True)
    assert torch.equal(g16_nb, g16_ref)
    assert int(got[1]) == int(want[1]) and torch.equal(got[0], want[0])


def test_adc_grad_dense_sparse_and_empty_paths_agree():
    g = torch.Generator().manual_seed(3)
    rows, n_out, k = 200, 64, 48
    grad = torch.randn(rows, n_out, generator=g)
    w = torch.randn(n_out, k, generator=g)
    xq = torch.randint(-127, 128, (rows, k), generator=g).float()

    def reference_grads(mask):
        gs = grad.masked_fill(mask, 0)
        return gs.t() @ xq, gs @ w

    # none; sparse; kept as indices but too many for the sparse path; a dense mask
    for n_sat in (0, 5, 150, 3000):
        mask = torch.zeros(rows * n_out, dtype=torch.bool)
        mask[torch.randperm(rows * n_out, generator=g)[:n_sat]] = True
        mask = mask.view(rows, n_out)
        sat = Marks(mask.numpy())
        assert sat.count == n_sat and torch.equal(sat.dense(), mask)
        assert (sat.flat is not None) == (0 < n_sat <= rows * n_out / 64)
        gs, sparse = NB.mask_adc_grad(grad, sat, k)
        if n_sat == 0:
            assert gs is grad and sparse is None
        elif n_sat == 5:
            assert gs is grad and isinstance(sparse, SparseADCGrad)
        else:
            assert sparse is None and torch.equal(gs, grad.masked_fill(mask, 0))
        gw, gx = gs.t() @ xq, gs @ w
        if sparse is not None:
            sparse.remove_from_weight_grad_(gw, xq)
            sparse.remove_from_input_grad_(gx, w)
        gw_ref, gx_ref = reference_grads(mask)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-4)
    # a plain bool mask (what the torch chain returns) takes the dense path
    gs, sparse = NB.mask_adc_grad(grad, mask, k)
    assert sparse is None and torch.equal(gs, grad.masked_fill(mask, 0))


def _layer_case(config, k, dtype=torch.float32, rows=400, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows // 2, k, generator=g) * 2).to(dtype).requires_grad_(True)
    w = (torch.randn(72, k, generator=g) * 0.05).to(dtype).requires_grad_(True)
    b = (torch.randn(72, generator=g) * 0.1).to(dtype).requires_grad_(True)
    n_tiles = config.num_tiles(k)
    r = torch.linspace(0.6, 1.2, n_tiles).requires_grad_(True)
    return x, w, b, r, torch.randn(2, rows // 2, 72, generator=g).to(dtype)


CONFIGS = {
    "afm-paper": (get_preset("afm-paper"), 200),
    "tiles (3, per-layer clip)": (replace(get_preset("tiny-stress"), max_input_size=80), 200),
    "ahwa-lora (output noise)": (get_preset("ahwa-lora"), 600),
    "w4a8 (no ADC)": (get_preset("w4a8-qat"), 200),
    "dynamic inputs (torch fallback)": (
        replace(
            get_preset("afm-paper"),
            input=InputQuantConfig(bits=8, dynamic=True, learn_ranges=False),
        ),
        200,
    ),
    "ranges, no input bits": (
        replace(get_preset("afm-paper"), input=InputQuantConfig(bits=None, learn_ranges=True)),
        200,
    ),
    "no ADC bits": (replace(get_preset("afm-paper"), output=OutputQuantConfig(None, None)), 200),
}


class NBChains(NB):
    """The fused chains with the oracle's weight noise (torch.randn), to compare exactly;
    the counter-based noise is tested in distribution (tests/kernels/test_philox.py)."""

    noisy_weight = None


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("training", [True, False])
def test_layer_forward_and_grads_match_torch(name, training):
    config, k = CONFIGS[name]
    results = []
    for elementwise in (TE, NBChains):
        x, w, b, r, gy = _layer_case(config, k)
        y = ref.analog_linear(
            x, w, b, r, config, training=training, seed=11, elementwise=elementwise
        )
        y.backward(gy)
        results.append((y.detach(), x.grad, w.grad, b.grad, r.grad))
    for got, want in zip(results[1], results[0], strict=True):
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)


def test_bf16_falls_back_to_the_torch_chains():
    config, k = CONFIGS["afm-paper"]
    results = []
    for elementwise in (TE, NB):
        x, w, b, r, gy = _layer_case(config, k, dtype=torch.bfloat16)
        y = ref.analog_linear(x, w, b, r, config, training=True, seed=3, elementwise=elementwise)
        y.backward(gy)
        results.append((y.detach().float(), x.grad.float(), w.grad.float(), r.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_auto_backend_is_numba_on_cpu_and_falls_back_without_it(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.resolve_backend(Backend.AUTO, cpu) is Backend.NUMBA
    assert ops.resolve_backend(Backend.NUMBA, cpu) is Backend.NUMBA
    assert ops.resolve_backend(Backend.TORCH, cpu) is Backend.TORCH
    layer = AnalogLinear(16, 8, config=get_preset("afm-paper"))
    assert layer.backend_for(cpu) is Backend.NUMBA
    monkeypatch.setattr(ops, "numba_available", lambda: False)
    assert ops.resolve_backend(Backend.AUTO, cpu) is Backend.TORCH
    with pytest.raises(RuntimeError, match=r"afm\[cpu\]"):
        ops.resolve_backend(Backend.NUMBA, cpu)


def test_layer_backends_agree_and_leave_torch_threads_alone():
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 40)
    layers = {
        be: AnalogLinear.from_linear(base, replace(get_preset("afm-paper"), backend=be)).eval()
        for be in ("torch", "numba")
    }
    x = torch.randn(3, 50, 96)
    threads = torch.get_num_threads()
    with torch.no_grad():
        out = {be: layer(x) for be, layer in layers.items()}
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(out["numba"], out["torch"], rtol=1e-5, atol=1e-5)


def test_kernels_load_from_cache_in_a_new_process():
    # cache=True: a second process must not fail on (or silently skip) the cached code
    code = (
        "import torch; from afm.kernels.numba_chains import NumbaElementwise as NB;"
        "x = torch.randn(4, 8); q, p, c = NB.quantize_static_input(x, torch.tensor(1.0),"
        " torch.tensor(2 / 254), save=True); print(c.count == int((x.abs() >= 1).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("size", [0, 7, 8, 1001, 4096])
@pytest.mark.parametrize("dtype", [np.int8, np.bool_])
def test_nonzero_scan_matches_numpy(size, dtype):
    rng = np.random.default_rng(size)
    a = (rng.integers(-1, 2, size) * (rng.random(size) < 0.05)).astype(dtype)
    count = int(np.count_nonzero(a))
    assert np.array_equal(_nonzero(a, count), np.flatnonzero(a))
    assert np.array_equal(_nonzero(a.reshape(-1, 1), count), np.flatnonzero(a))


def test_scratch_buffers_do_not_pile_up_with_varying_shapes(monkeypatch):
    from afm.kernels import numba_chains as numba_kernels

    monkeypatch.setattr(numba_kernels._SCRATCH, "buffers", {})
    r = torch.tensor(1.0)
    for rows in range(1, 40):  # e.g. prompt lengths in evaluation
        x = torch.randn(rows, 16)
        q, _, _ = NB.quantize_static_input(x, r, 2 * r / 254, save=False)
        assert torch.equal(q, TE.quantize_static_input(x, r, 2 * r / 254, save=False)[0])
    buffers = numba_kernels._SCRATCH.buffers
    assert len([key for key in buffers if key[0] == "input"]) == 1
    assert buffers[("input", torch.float32)].numel() == 39 * 16
