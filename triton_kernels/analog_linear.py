"""Launcher and autograd for the fused Triton analog linear layer.

``triton_analog_linear(x, weight, bias, input_range, config, *, training, seed)``
has the signature of ``afm.reference.analog_linear`` and the same math (spec:
hardware-model.md §1-4).  The whole layer is one ``torch.autograd.Function``
(:class:`TritonAnalogLinearFunction`): forward = one fused Triton kernel (plus a
small abs-max kernel when weight statistics are needed); backward = torch
matmuls (cuBLAS) on the quantized input, recomputed from ``x``, and the noisy
weight, regenerated from the seed.

Of afm this module imports only the spec, ``afm.reference``: the tile split, the
weight fake-quantization, the input-range gradient and the rules "which noise is on
in this mode" and "is the ADC bound per channel" come from there, so both backends
follow one definition.  ``config`` is otherwise read by attribute (enums compared by
their ``.value``); the kernels themselves (``kernels.py``) import nothing from afm.

Noise design
------------
Weight noise ``σ_w·a·ξ`` is generated from a seed with ``tl.randn(seed_w, n·K + k)``:
the Philox counter is the global weight element index, so every program that
touches ``W[n, k]`` draws the same ξ, whatever the block sizes.  For few tokens
(``INKERNEL_NOISE_MAX_TOKENS``, decode) the fused kernel draws it itself; for more,
the ``cdiv(M, BLOCK_M)`` row-programs would each redraw the whole weight's noise
(Philox + Box-Muller per element, on CUDA cores, several times the cost of the
tensor-core MMA), so ``noisy_weight_kernel`` writes ``W + σ·a·ξ`` once into a
temporary that the fused kernel reads instead; it is freed when the forward
returns.  Both paths give bitwise the same noisy weight (same device function, same
counters).  Neither ever writes to the stored weight.  The backward needs the
same noisy weight; it is **regenerated** from the seed by ``noisy_weight_kernel``
(same device function, same counters) into a temporary that lives only during the
backward.  Keeping it from the forward instead would hold one extra weight-sized
tensor per layer for the whole forward/backward span (+1× the model's weight
memory when training billion-parameter models), while regenerating costs one
elementwise pass over W per backward, small next to the two matmuls.

Output noise uses a second stream ``seed_o + s`` (one key per tile) with the
output element index ``m·N + n`` as counter.  The streams differ from the torch
reference's ``torch.randn`` draws, so noisy outputs agree with the reference only
in distribution; a given seed reproduces exactly.

Precision
---------
x and W are loaded in their dtype and upcast to fp32 for all quantization math;
the quantized input and the noisy weight are rounded to the input dtype (as the
reference's ``.to(dtype)``), ``tl.dot`` runs on tensor cores for fp16/bf16 and in
IEEE fp32 for fp32 inputs, always accumulating in fp32.  Unlike the torch
reference for half dtypes, the per-tile matmul result is not rounded to
fp16/bf16 before the ADC; the kernel is the more accurate of the two there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from afm import reference

from . import kernels

logger = logging.getLogger(__name__)

__all__ = [
    "TritonAnalogLinearFunction",
    "triton_analog_linear",
    "tile_absmax",
    "noisy_weight",
    "tile_split",
]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SEED_MASK = (1 << 62) - 1
_TINY = torch.finfo(torch.float32).tiny

WIDE_INDEX_FROM = 2**31
"""Kernels address with int64 once an index space (N·K, M·K, M·N) reaches this size."""

INKERNEL_NOISE_MAX_TOKENS = 64
"""Up to this many tokens the fused kernel draws the weight noise itself; above, the
noisy weight is materialised once per call by ``noisy_weight_kernel`` (same values)."""


# --------------------------------------------------------------------------- config, duck-typed
def _val(x: Any) -> Any:
    """An enum's value (``WeightNoiseKind.ADD_GAUSS`` → "add_gauss"), anything else as is."""
    return getattr(x, "value", x)


def _steps(bits: int | None) -> int | None:
    return None if bits is None else 2**bits - 2


@dataclass(frozen=True)
class _Plan:
    """The numbers the kernel needs, read once from an AnalogConfig-like object."""

    n_in: int | None
    n_out: int | None
    out_bound: float | None
    in_mode: int
    decay: float
    min_fraction: float
    adc_per_channel: bool
    w_noise_kind: str  # "none" | "add_gauss" | "add_gauss_per_channel"
    w_noise_std: float
    o_noise_std: float
    o_noise_per_channel: bool
    max_input_size: int | None
    wq_bits: int | None
    wq_group_size: int | None


def _plan(config: Any) -> _Plan:
    cin, cout = config.input, config.output
    dynamic = bool(cin.dynamic)
    uses_range = bool(cin.learn_ranges) and not dynamic
    n_in = _steps(cin.bits)
    if dynamic:
        mode = kernels.IN_DYNAMIC
    elif uses_range:
        mode = kernels.IN_QUANT if n_in is not None else kernels.IN_CLIP
    else:
        mode = kernels.IN_NONE
    wn, on = config.weight_noise, config.output_noise
    kind = str(_val(wn.kind))
    if kind not in ("none", "add_gauss", "add_gauss_per_channel"):
        raise NotImplementedError(
            f"weight_noise.kind={kind!r} is not supported by the triton backend"
        )
    if str(_val(getattr(cout, "bound_management", "none"))) != "none":  # auto picks torch
        msg = "output.bound_management is not supported by the triton backend yet: use torch"
        raise NotImplementedError(msg)
    wq = config.weight_quant
    return _Plan(
        n_in=n_in,
        n_out=_steps(cout.bits),
        out_bound=cout.bound,
        in_mode=mode,
        decay=float(cin.decay),
        min_fraction=float(cin.min_fraction),
        adc_per_channel=reference.adc_per_channel(config),
        w_noise_kind=kind,
        w_noise_std=float(wn.std),
        o_noise_std=float(on.std),
        o_noise_per_channel=bool(on.per_channel),
        max_input_size=config.max_input_size,
        wq_bits=wq.bits,
        wq_group_size=wq.group_size,
    )


# --------------------------------------------------------------------------- torch helpers
def tile_split(in_features: int, max_input_size: int | None) -> tuple[int, int, int]:
    """``(S, base, extra)`` of ``afm.reference.tile_bounds``: S balanced tiles, the first
    ``extra`` have ``base + 1`` columns (K=257, M=128 → 86, 86, 85)."""
    sizes = [hi - lo for lo, hi in reference.tile_bounds(in_features, max_input_size)]
    return len(sizes), sizes[-1], sum(size > sizes[-1] for size in sizes)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _seeds(seed: int) -> tuple[int, int]:
    """Weight-noise and output-noise keys from one seed; bit 61 set so both launch as int64."""
    seed_w = (int(seed) & _SEED_MASK) | (1 << 61)
    seed_o = (_splitmix64(int(seed)) & ((1 << 60) - 1)) | (1 << 61)  # + s stays < 2^62
    return seed_w, seed_o


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not kernels.INTERPRET:
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {t.device.type}); on CPU use "
            "backend='torch' (or set TRITON_INTERPRET=1 before importing afm.triton_kernels, "
            "for testing only)"
        )


def _tl_dtype(dtype: torch.dtype) -> Any:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"the triton backend supports float32, float16 and bfloat16 tensors, got {dtype}"
        ) from None


def _fp32_staging(dtype: torch.dtype) -> torch.dtype:
    """The interpreter cannot store bf16 correctly: stage in fp32 and cast in torch."""
    return torch.float32 if (kernels.INTERPRET and dtype == torch.bfloat16) else dtype


def tile_absmax(weight: Tensor, n_tiles: int, base: int, extra: int) -> Tensor:
    """``a[s, n] = max_{k in tile s} |W[n, k]|`` as fp32 ``[S, N]`` (one small kernel)."""
    n, k = weight.shape
    a = torch.empty((n_tiles, n), dtype=torch.float32, device=weight.device)
    block_n, block_k = (64, 128) if kernels.INTERPRET else (32, 128)
    grid = (triton.cdiv(n, block_n), n_tiles)
    kernels.tile_absmax_kernel[grid](
        weight, a, n, k, base, extra, weight.stride(0), weight.stride(1),
        WIDE_IDX=n * k >= WIDE_INDEX_FROM, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return a


def noisy_weight(
    weight: Tensor, scale: Tensor, seed_w: int, n_tiles: int, base: int, extra: int
) -> Tensor:
    """``(W + scale[s(k), n]·ξ).to(W.dtype)``: bitwise the noisy weight of the forward kernel."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=_fp32_staging(weight.dtype), device=weight.device)
    block_n, block_k = 64, 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    kernels.noisy_weight_kernel[grid](
        weight, scale, out, seed_w, n, k, base, extra, weight.stride(0), weight.stride(1),
        W_DTYPE=_tl_dtype(weight.dtype), EMULATE_BF16=kernels.INTERPRET,
        WIDE_IDX=n * k >= WIDE_INDEX_FROM, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out.to(weight.dtype)


# --------------------------------------------------------------------------- forward
def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_range: Tensor,
    config: Any,
    training: bool,
    seed: int | None,
    abs_max: Tensor | None,
    *,
    save: bool,
) -> tuple[Tensor, dict[str, Any] | None]:
    """The fused forward; with ``save`` also what the backward needs."""
    plan = _plan(config)
    _check_device(x)
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    dt = _tl_dtype(x.dtype)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    n_tiles, base, extra = tile_split(k, plan.max_input_size)
    dev = x.device

    w_noise_on, o_noise_on = reference.noise_in_mode(config, training)
    has_adc = plan.n_out is not None
    need_a = has_adc or w_noise_on or o_noise_on
    if (w_noise_on or o_noise_on) and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    seed_w, seed_o = _seeds(seed) if seed is not None else (0, 0)

    a = None
    if need_a:
        a = abs_max.float() if abs_max is not None else tile_absmax(weight, n_tiles, base, extra)
    a_tile = a.amax(dim=1, keepdim=True).expand_as(a) if a is not None else None
    r_all = input_range.detach().float()
    dummy = torch.empty(1, dtype=torch.float32, device=dev)

    # ---- per-tile scales, with the reference's expressions (same fp32 values) ----
    dyn_unit = None
    unit = inv_unit = rpu = dummy
    r_per_unit: Tensor | float | None = None
    stride_us = stride_um = 0
    if plan.in_mode == kernels.IN_QUANT:
        unit = (2 * r_all / plan.n_in).reshape(n_tiles, 1)
        inv_unit = 1.0 / unit
        stride_us, stride_um = 1, 0
        r_per_unit = plan.n_in / 2
    elif plan.in_mode == kernels.IN_DYNAMIC:
        r_dyn = torch.stack(
            [
                x2[:, lo:hi].float().abs().amax(dim=1)
                for lo, hi in reference.tile_bounds(k, plan.max_input_size)
            ]
        ).clamp_min(_TINY)  # [S, M]
        unit = 2 * r_dyn / plan.n_in
        stride_us, stride_um = m, 1
        dyn_unit = unit
        r_per_unit = plan.n_in / 2
    elif plan.in_mode == kernels.IN_CLIP:
        r_per_unit = r_all.reshape(n_tiles, 1)
    if r_per_unit is not None:
        rpu = torch.as_tensor(r_per_unit, dtype=torch.float32, device=dev).expand(n_tiles, 1)
        rpu = rpu.contiguous()
    step = istep = wscale = oscale = dummy
    if has_adc:
        a_b = a if plan.adc_per_channel else a_tile
        step = ((2 * plan.out_bound / plan.n_out) * a_b.clamp_min(_TINY) * r_per_unit).contiguous()
        istep = 1.0 / step
    if w_noise_on:
        s_w = a if plan.w_noise_kind == "add_gauss_per_channel" else a_tile
        wscale = (plan.w_noise_std * s_w).contiguous()
    if o_noise_on:
        a_o = a if plan.o_noise_per_channel else a_tile
        oscale = (plan.o_noise_std * a_o).contiguous()

    # Weight noise: generated inside the fused kernel for few tokens (decode); for
    # more, each of the cdiv(M, BLOCK_M) row-programs would redraw the same ξ, so the
    # noisy weight is written once into a temporary (same values, bitwise) instead.
    noise_in_kernel = w_noise_on and m <= INKERNEL_NOISE_MAX_TOKENS
    w_kernel = weight
    if w_noise_on and not noise_in_kernel:
        w_kernel = noisy_weight(weight, wscale, seed_w, n_tiles, base, extra)
    save_mask = save and has_adc
    out = torch.empty((m, n), dtype=_fp32_staging(x.dtype), device=dev)
    sat = (
        torch.empty(((n_tiles + 31) // 32, m, n), dtype=torch.int32, device=dev)
        if save_mask
        else torch.empty(1, dtype=torch.int32, device=dev)
    )
    interp = kernels.INTERPRET
    wide = max(n * k, m * k, m * n * ((n_tiles + 31) // 32)) >= WIDE_INDEX_FROM
    meta = dict(kernels.INTERPRET_CONFIG) if interp else {}
    launch_grid = lambda META: (  # noqa: E731
        triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),
    )
    if m > 0:
        kernels.analog_fwd_kernel[launch_grid](
            x2, w_kernel, bias if bias is not None else dummy, out, sat,
            r_all, unit, inv_unit, rpu, step, istep, wscale, oscale, seed_w, seed_o,
            m, n, k, n_tiles, base, extra, kernels.m_bucket(m),
            x2.stride(0), x2.stride(1), w_kernel.stride(0), w_kernel.stride(1),
            out.stride(0), out.stride(1), stride_us, stride_um,
            N_IN=plan.n_in or 0, N_OUT=plan.n_out or 0, IN_MODE=plan.in_mode,
            HAS_ADC=has_adc, HAS_WNOISE=noise_in_kernel, HAS_ONOISE=o_noise_on,
            HAS_BIAS=bias is not None, SAVE_MASK=save_mask,
            X_DTYPE=dt, W_DTYPE=dt, DOT_DTYPE=tl.float32 if interp else dt,
            DOT_PRECISION="ieee" if (interp or dt == tl.float32) else "tf32",
            EMULATE_BF16=interp, WIDE_IDX=wide,
            ALIGNED=extra == 0 and base % 16 == 0,
            **meta,
        )  # fmt: skip
    del w_kernel
    out = out.to(x.dtype).reshape(*x.shape[:-1], n)

    if not save:
        return out, None
    state = {
        "plan": plan,
        "x_shape": x.shape,
        "split": (n_tiles, base, extra),
        "has_bias": bias is not None,
        "seed_w": seed_w if w_noise_on else None,
        "save_mask": save_mask,
        "tensors": (x2, weight, r_all, sat if save_mask else None, wscale if w_noise_on else None,
                    dyn_unit),
    }  # fmt: skip
    return out, state


# --------------------------------------------------------------------------- autograd
class TritonAnalogLinearFunction(torch.autograd.Function):
    """``y = analog(x Wᵀ) + b`` for all tiles; same inputs and gradients as the torch
    reference's ``AnalogLinearFunction``: ``(x, weight, bias, input_range, config,
    training, seed, abs_max=None)``."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        input_range: Tensor,
        config: Any,
        training: bool,
        seed: int | None,
        abs_max: Tensor | None = None,
    ) -> Tensor:
        save = any(ctx.needs_input_grad[:4])
        out, state = _forward(
            x, weight, bias, input_range, config, training, seed, abs_max, save=save
        )
        if state is not None:
            ctx.plan, ctx.x_shape, ctx.split = state["plan"], state["x_shape"], state["split"]
            ctx.has_bias, ctx.seed_w = state["has_bias"], state["seed_w"]
            ctx.save_mask = state["save_mask"]
            ctx.save_for_backward(*state["tensors"])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, weight, r_all, sat, wscale, dyn_unit = ctx.saved_tensors
        plan: _Plan = ctx.plan
        n_tiles, base, extra = ctx.split
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        # The noisy weight, regenerated from the seed (see the module docstring).
        w_eff = weight
        if ctx.seed_w is not None and (need_x or need_r):
            w_eff = noisy_weight(weight, wscale, ctx.seed_w, n_tiles, base, extra)
        dtype = x2.dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (
            torch.empty(g2.shape[0], w_eff.shape[1], dtype=grad_out.dtype, device=g2.device)
            if need_x
            else None
        )
        grad_w = torch.empty_like(weight) if need_w else None
        grad_r = torch.zeros_like(r_all) if need_r else None
        bounds = reference.tile_bounds(x2.shape[1], plan.max_input_size)
        single = n_tiles == 1
        for s, (lo, hi) in enumerate(bounds):
            xf = (x2 if single else x2[:, lo:hi]).float()
            # ---- the quantized input, recomputed exactly as the forward made it ----
            clip = None
            if plan.in_mode == kernels.IN_DYNAMIC:
                unit = dyn_unit[s].unsqueeze(1)
                xq = torch.round(torch.clamp(xf / unit, -plan.n_in / 2, plan.n_in / 2))
            elif plan.in_mode in (kernels.IN_QUANT, kernels.IN_CLIP):
                r_s = r_all[s]
                clip = (xf >= r_s, xf <= -r_s)
                if plan.in_mode == kernels.IN_QUANT:
                    unit = 2 * r_s / plan.n_in
                    xq = torch.mul(xf, 1.0 / unit).clamp_(-plan.n_in / 2, plan.n_in / 2).round_()
                else:
                    unit = torch.ones((), device=x2.device)
                    xq = torch.maximum(torch.minimum(xf, r_s), -r_s)
            else:
                unit, xq = torch.ones((), device=x2.device), xf
            xq = xq.to(dtype)
            gs = g2
            if ctx.save_mask:
                bit = ((sat[s // 32] >> (s % 32)) & 1).bool()
                gs = g2.masked_fill(bit, 0)
            gs = gs.to(w_eff.dtype)
            if need_w:  # the noise is additive: the gradient passes straight to W
                if unit.dim() == 0:
                    gw = (gs.t() @ xq).float() * unit
                else:  # dynamic ranges: one unit per token
                    gw = (gs * unit.to(gs.dtype)).t() @ xq
                if single:
                    grad_w = gw.to(weight.dtype)
                else:
                    grad_w[:, lo:hi] = gw
            if need_x or need_r:
                gx = gs @ (w_eff if single else w_eff[:, lo:hi])
                if clip is not None:
                    upper, lower = clip
                    if need_r:
                        grad_r[s] = reference.input_range_grad(
                            xf, gx, r_s, plan.decay, plan.min_fraction
                        )
                    gx = gx.masked_fill(upper | lower, 0)
                if need_x:
                    if single:
                        grad_x = gx.to(grad_out.dtype)
                    else:
                        grad_x[:, lo:hi] = gx
        grad_b = g2.sum(0) if (ctx.has_bias and need_b) else None
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_r, None, None, None, None


def triton_analog_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_range: Tensor,
    config: Any,
    *,
    training: bool,
    seed: int | None = None,
    abs_max: Tensor | None = None,
) -> Tensor:
    """The analog layer's forward on the Triton backend (signature of the torch one).

    ``config`` is an ``afm.config.AnalogConfig`` (read by attribute).  ``abs_max``
    optionally passes precomputed ``[S, N]`` statistics ``a[s, i]`` (the layer caches
    them in eval mode); otherwise a small kernel computes them.  Weight
    fake-quantization (``config.weight_quant``) runs in torch before the kernel, with
    a straight-through gradient, as in the torch backend.
    """
    plan = _plan(config)
    w = weight
    if plan.wq_bits is not None:
        w = reference.fake_quantize_weight(w, plan.wq_bits, plan.wq_group_size)
        abs_max = None  # statistics of the quantized weight
    noisy = any(reference.noise_in_mode(config, training))
    if not (noisy or plan.in_mode != kernels.IN_NONE):
        return torch.nn.functional.linear(x, w, bias)
    tensors = (x, w, bias, input_range)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TritonAnalogLinearFunction.apply(
            x, w, bias, input_range, config, training, seed, abs_max
        )
    # Inference: no autograd node, no ADC-bound bits written.
    return _forward(x, w, bias, input_range, config, training, seed, abs_max, save=False)[0]
