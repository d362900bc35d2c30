"""Pure-torch implementation of the analog hardware model (spec §1-4).

This module is three things at once: the specification in code, the CPU path
of ``AnalogLinear``, and the oracle the Triton kernels are tested against.

How the math is arranged (and why):

* Inputs are quantized on an integer grid: ``x_int = round(clamp(x/Δ, ±n/2))``
  with ``Δ = 2r/n``, so ``x_q = Δ·x_int``.  The matmul runs on ``x_int`` and the
  output is rescaled once.  This is the spec's ``Δ·round(clamp(x,±r)/Δ)``
  written with one multiply fewer per element.
* The ADC step in units of that integer grid, ``Δ_in/Δ_out = n_out /
  (n_in · out_bound · a)``, does not depend on ``r`` at all: the global bound is
  normalised by the input range, so ``r`` cancels.  The clamp on the output
  grid is the constant ``±n_out/2``.
* One ``autograd.Function`` covers the whole layer (all tiles), so the backward
  touches only what it needs: the quantized input, the (noisy) weight, two
  boolean masks and the per-tile range-gradient sums.  Its gradients are the
  spec's: straight-through rounding, zero gradient for clipped inputs and for
  outputs past the ADC bound, and the custom input-range gradient (§2.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from afm import bound_management as bm
from afm.config import AnalogConfig, ClipKind, WeightNoiseKind
from afm.kernels.torch_chains import TorchElementwise

__all__ = [
    "tile_bounds",
    "weight_abs_max",
    "input_steps",
    "quantize_input",
    "quantize_output",
    "input_range_grad",
    "fake_quantize_weight",
    "clip_weight_",
    "noisy_weight",
    "init_range_update",
    "noise_in_mode",
    "adc_per_channel",
    "analog_linear",
    "AnalogLinearFunction",
]


# --------------------------------------------------------------------------- §1 tiles
def tile_bounds(in_features: int, max_input_size: int | None) -> list[tuple[int, int]]:
    """Balanced split of K into ``ceil(K/M)`` tiles (K=257, M=128 → 86, 86, 85)."""
    if in_features < 1:
        raise ValueError(f"in_features={in_features} must be >= 1")
    if max_input_size is None or max_input_size >= in_features:
        return [(0, in_features)]
    n_tiles = math.ceil(in_features / max_input_size)
    base, extra = divmod(in_features, n_tiles)
    bounds, start = [], 0
    for s in range(n_tiles):
        size = base + (1 if s < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def weight_abs_max(weight: Tensor, bounds: Sequence[tuple[int, int]]) -> Tensor:
    """``a[s, i] = max_j |W_s[i, j]|`` as fp32 of shape [S, N_out] (spec §1)."""
    w = weight.detach()
    if len(bounds) == 1:
        return w.abs().amax(dim=1).float().unsqueeze(0)
    return torch.stack([w[:, a:b].abs().amax(dim=1).float() for a, b in bounds])


def _steps(bits: int | None) -> int | None:
    """Number of quantization steps ``2^b - 2`` (levels -n/2 .. n/2)."""
    return None if bits is None else 2**bits - 2


def input_steps(config: AnalogConfig) -> int | None:
    return _steps(config.input.bits)


def noise_in_mode(config: AnalogConfig, training: bool) -> tuple[bool, bool]:
    """``(weight noise on, output noise on)`` for a forward in this mode (spec §4,
    "Training vs eval"): each in training, and at eval when its ``keep_at_eval`` is set
    (aihwkit's analog MVM keeps its output noise at inference).  Every backend and the
    layer ask this function."""
    wn, on = config.weight_noise, config.output_noise
    return (
        wn.enabled and (training or wn.keep_at_eval),
        on.std > 0 and (training or on.keep_at_eval),
    )


def adc_per_channel(config: AnalogConfig) -> bool:
    """Whether the ADC bound uses the per-channel weight range ``a[s, i]`` rather than the
    tile's ``a[s]`` (spec §4.2): ``output.per_channel``, or when that is None, exactly when
    clipping is per channel."""
    if config.output.per_channel is not None:
        return config.output.per_channel
    return config.clip.kind is ClipKind.GAUSSIAN_PER_CHANNEL


# --------------------------------------------------------------------------- §2 input
def quantize_input(x: Tensor, r: Tensor | float, bits: int | None) -> Tensor:
    """Spec §2.1-2.2 forward only: ``Δ·round(clamp(x, ±r)/Δ)`` (fp32 math)."""
    xf = x.float()
    r = torch.as_tensor(r, dtype=torch.float32, device=x.device)
    x_c = torch.maximum(torch.minimum(xf, r), -r)
    if bits is None:
        return x_c.to(x.dtype)
    delta = 2 * r / _steps(bits)
    return (torch.round(x_c / delta) * delta).to(x.dtype)


def input_range_grad(
    x: Tensor, grad: Tensor, r: Tensor, decay: float, min_fraction: float
) -> Tensor:
    """Spec §2.3 for one tile: the gradient of the loss w.r.t. its range ``r``.

    ``grad`` is the gradient arriving at the quantized input.
    """
    sign = (x >= r).to(torch.int8) - (x <= -r).to(torch.int8)
    return _range_grad_from_sign(grad, sign, r, decay, min_fraction)


def init_range_update(r: Tensor, x_tile: Tensor, k: int, alpha: float) -> Tensor:
    """Spec §2.4: ``r ← |(r·k + α·std(x)) / (k + 1)|`` (one calibration batch)."""
    std = x_tile.detach().float().std()
    if not torch.isfinite(std) or std <= 0:
        return r.abs()
    return ((r.float() * k + alpha * std) / (k + 1)).abs().to(r.dtype)


# --------------------------------------------------------------------------- §3 weight
def fake_quantize_weight(weight: Tensor, bits: int = 4, group_size: int | None = None) -> Tensor:
    """Symmetric round-to-nearest weight quantization with a straight-through gradient.

    ``Δ = max|W| / (2^(b-1) - 1)`` over each output channel (``group_size=None``) or
    each group of ``group_size`` consecutive inputs; ``q = clamp(round(W/Δ), ±qmax)``.
    """
    if bits < 2:
        raise ValueError(f"bits={bits} must be >= 2")
    n_out, k = weight.shape
    if group_size is not None and k % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    g = w if group_size is None else w.reshape(n_out, k // group_size, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / scale), -qmax, qmax) * scale
    q = q.reshape(n_out, k).to(weight.dtype)
    # Straight-through: forward is q, gradient passes to the weight unchanged.
    return weight + (q - weight).detach()


@torch.no_grad()
def clip_weight_(weight: Tensor, kind: ClipKind, sigma: float) -> Tensor:
    """Spec §3 clipping in place: ``W ← clamp(W, ±σ·std(W))`` (per row or per matrix)."""
    if kind is ClipKind.NONE:
        return weight
    w = weight.float()
    if kind is ClipKind.GAUSSIAN_PER_CHANNEL:
        bound = _row_std(w).mul_(sigma)
    else:
        bound = sigma * w.std()
    if w is weight:  # fp32: in place, no copies
        return weight.clamp_(-bound, bound)
    weight.copy_(torch.clamp(w, -bound, bound).to(weight.dtype))
    return weight


def _row_std(w: Tensor) -> Tensor:
    """``w.std(dim=1, keepdim=True)`` (ddof 1), two-pass, ~10x faster on CPU.

    torch's row-wise std kernel runs ~6 ns per element on CPU; clipping calls it
    for every analog layer after every optimizer step.
    """
    centered = w - w.mean(dim=1, keepdim=True)
    n = max(w.shape[1] - 1, 1)
    return torch.linalg.vector_norm(centered, dim=1, keepdim=True).div_(n**0.5)


def noisy_weight(
    weight: Tensor,
    a: Tensor,
    bounds: Sequence[tuple[int, int]],
    kind: WeightNoiseKind,
    std: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Spec §3: ``W + σ_w·a·ξ`` (a per channel or per tile), a new tensor in W's dtype."""
    xi = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    if kind is WeightNoiseKind.ADD_GAUSS_PER_CHANNEL:
        scale = a  # [S, N]
    else:
        scale = a.amax(dim=1, keepdim=True).expand_as(a)
    w = weight.float()
    if len(bounds) == 1:
        # one fused pass: ξ ← W + ξ·σa
        out = torch.addcmul(w, xi, (std * scale[0]).unsqueeze(1), out=xi)
    else:
        for s, (lo, hi) in enumerate(bounds):
            xi[:, lo:hi].mul_((std * scale[s]).unsqueeze(1))
        out = xi.add_(w)
    return out.to(weight.dtype)


# --------------------------------------------------------------------------- §4 output
def quantize_output(y: Tensor, bound: Tensor, bits: int) -> Tensor:
    """Spec §4.2 forward only: ``clamp(Δ·round(y/Δ), ±B)`` with ``Δ = 2B/n``."""
    delta = 2 * bound / _steps(bits)
    return torch.maximum(torch.minimum(torch.round(y / delta) * delta, bound), -bound)


# --------------------------------------------------------------------------- the layer
def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_range: Tensor,
    config: AnalogConfig,
    training: bool,
    seed: int | None,
    abs_max: Tensor | None,
    *,
    save: bool,
    elementwise: type = TorchElementwise,
):
    """The forward of all tiles; with ``save`` also what the backward needs.

    The elementwise chains around the matmuls (input quantization, ADC, and their
    gradient masks) come from ``elementwise``: ``TorchElementwise`` (the oracle) or a
    class with the same static methods (``afm.kernels.numba_chains.NumbaElementwise``).  On
    CPU those chains, not the matmuls' overhead, decide how close the layer gets to
    ``nn.Linear``.
    """
    cfg_in, cfg_out = config.input, config.output
    n_in, n_out = _steps(cfg_in.bits), _steps(cfg_out.bits)
    bounds = tile_bounds(weight.shape[1], config.max_input_size)
    single = len(bounds) == 1
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    tiny = torch.finfo(torch.float32).tiny

    wn, on = config.weight_noise, config.output_noise
    w_noise_on, o_noise_on = noise_in_mode(config, training)
    gen = _make_generator(seed, weight.device) if (w_noise_on or o_noise_on) else None
    a = abs_max
    if a is None and (n_out is not None or w_noise_on or o_noise_on):
        a = weight_abs_max(weight, bounds)
    w_eff = weight
    if w_noise_on:
        w_eff = noisy_weight(weight, a, bounds, wn.kind, wn.std, gen)

    per_channel_adc = adc_per_channel(config)
    bm_limit = bm.bound_management_limit(config) if bm.iterative(config) else None
    r_all = input_range.detach().float()
    out = None
    saved, units, clips, out_masks = [], [], [], []
    for s, (lo, hi) in enumerate(bounds):
        x_tile = x2 if single else x2[:, lo:hi]
        ws = w_eff if single else w_eff[:, lo:hi]
        # ---- input path (§2) on an integer grid: x_q = unit · xq ----
        clip, packed = None, None  # packed: a compact copy of xq for the backward, if any
        if cfg_in.dynamic:
            xf = x_tile.float()
            r_s = xf.abs().amax(dim=1, keepdim=True).clamp_min(tiny)  # per token
            unit = 2 * r_s / n_in
            xq = torch.round(xf / unit)
            r_per_unit = n_in / 2
        elif cfg_in.uses_range and n_in is not None:
            r_s = r_all[s]
            unit = 2 * r_s / n_in
            xq, packed, clip = elementwise.quantize_static_input(x_tile, r_s, unit, save=save)
            r_per_unit = n_in / 2
        elif cfg_in.uses_range:  # ranges without quantization: clamp only
            r_s = r_all[s]
            unit = torch.ones((), device=x.device)
            xq, packed, clip = elementwise.quantize_static_input(x_tile, r_s, None, save=save)
            r_per_unit = r_s
        else:  # no ranges, no quantization (config validation guarantees it)
            unit, xq, r_per_unit = torch.ones((), device=x.device), x_tile.float(), None
        xq = xq.to(dtype)
        y = (xq @ ws.t()).float()  # in units of `unit`
        # ---- output noise (§4.1): σ_o · r · a · ξ ----
        noise = None
        if o_noise_on:
            a_o = a[s] if on.per_channel else a[s].amax()
            noise = bm.output_noise(gen, on.std * a_o * r_per_unit)
            y = noise(y)
        # ---- ADC (§4.2): Δ_out = 2B/n_out, B = bound · r · a; bound management (§4.3) ----
        out_mask = None
        if n_out is not None:
            a_b = a[s] if per_channel_adc else a[s].amax()
            step = (2 * cfg_out.bound / n_out) * a_b.clamp_min(tiny) * r_per_unit
            if bm_limit is not None:
                bm.rerun_saturated(
                    xf, r_s, ws, y, xq, unit,
                    step=step, n_in=n_in, n_out=n_out, limit=bm_limit, noise=noise,
                )  # fmt: skip
            out, out_mask = elementwise.adc_accumulate(y, step, unit, n_out, out, bias, save=save)
        elif out is None and bias is not None:
            out = torch.addcmul(bias.float(), y, unit)
        elif out is None:
            out = y.mul_(unit)
        else:
            out = out.addcmul_(y, unit)
        if save:
            saved.append(xq if packed is None else packed)
            units.append(unit)
            clips.append(clip)
            out_masks.append(out_mask)
    out = out.to(dtype).reshape(*x.shape[:-1], weight.shape[0])
    return out, ((w_eff, r_all, saved, units, clips, out_masks) if save else None)


class AnalogLinearFunction(torch.autograd.Function):
    """``y = analog(x Wᵀ) + b`` for all tiles, with the spec's custom gradients.

    Inputs: ``x [..., K]``, ``weight [N, K]`` (already fake-quantized by the caller),
    ``bias [N] | None``, ``input_range [S]`` fp32 (ignored unless ranges are used), the
    config, whether the layer is training (noise on), the seed of this call's noise, optional
    precomputed abs-max statistics and the elementwise chains (see ``_forward``).  The noisy
    weight is kept for the backward: on CPU regenerating it costs a full ``randn``
    over the weight, more than the memory it saves is worth for the torch path.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        input_range: Tensor,
        config: AnalogConfig,
        training: bool,
        seed: int | None,
        abs_max: Tensor | None = None,
        elementwise: type = TorchElementwise,
    ) -> Tensor:
        out, state = _forward(
            x, weight, bias, input_range, config, training, seed, abs_max,
            save=True, elementwise=elementwise,
        )  # fmt: skip
        w_eff, r_all, saved, units, clips, out_masks = state
        ctx.config, ctx.x_shape, ctx.has_bias = config, x.shape, bias is not None
        ctx.elementwise = elementwise
        ctx.bounds = tile_bounds(weight.shape[1], config.max_input_size)
        ctx.units, ctx.clips, ctx.out_masks = units, clips, out_masks
        ctx.save_for_backward(w_eff, r_all, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w_eff, r_all, *saved = ctx.saved_tensors
        cfg_in = ctx.config.input
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        grad_x = (
            torch.empty(g2.shape[0], w_eff.shape[1], dtype=grad_out.dtype, device=grad_out.device)
            if need_x
            else None
        )
        grad_w = torch.empty_like(w_eff) if need_w else None
        grad_r = torch.zeros_like(r_all) if need_r else None
        single = len(ctx.bounds) == 1
        for s, (lo, hi) in enumerate(ctx.bounds):
            gs, sparse = g2, None
            if ctx.out_masks[s] is not None:
                # Either g with zeros past the ADC bound, or g itself plus the few
                # saturated entries whose products the matmuls then take back out.
                gs, sparse = ctx.elementwise.mask_adc_grad(g2, ctx.out_masks[s], hi - lo)
            gs = gs.to(w_eff.dtype)
            unit = ctx.units[s]
            w_s = w_eff if single else w_eff[:, lo:hi]
            if need_w:  # noise is additive: the gradient passes straight to W
                if unit.dim() == 0:
                    xq = ctx.elementwise.unpack_input(saved[s])
                    gw = gs.t() @ xq
                    if sparse is not None:
                        sparse.remove_from_weight_grad_(gw, xq)
                    gw = gw.float() * unit
                else:  # dynamic ranges: one unit per token (never sparse)
                    gw = (gs * unit.to(gs.dtype)).t() @ saved[s]
                if single:
                    grad_w = gw.to(w_eff.dtype)
                else:
                    grad_w[:, lo:hi] = gw
            if need_x or need_r:
                gx = gs @ w_s
                if sparse is not None:
                    sparse.remove_from_input_grad_(gx, w_s)
                clip = ctx.clips[s]
                if clip is not None:
                    total, n_clipped = ctx.elementwise.mask_clipped_grad_(
                        gx, clip, count=cfg_in.decay > 0
                    )
                    if need_r:
                        grad_r[s] = _range_grad(
                            total,
                            n_clipped,
                            gx.numel(),
                            r_all[s],
                            cfg_in.decay,
                            cfg_in.min_fraction,
                        )
                if need_x:
                    if single:
                        grad_x = gx.to(grad_out.dtype)
                    else:
                        grad_x[:, lo:hi] = gx
        grad_b = g2.sum(0) if (ctx.has_bias and need_b) else None
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None


def _range_grad(
    total: Tensor,
    n_clipped: Tensor | None,
    numel: int,
    r: Tensor,
    decay: float,
    min_fraction: float,
) -> Tensor:
    """Spec §2.3 from ``total = Σ min(sign·g, 0)`` and the number of clipped inputs."""
    out = r * total
    if decay > 0:
        not_clipped = 1.0 - n_clipped.float() / numel
        out = out + decay * r * (not_clipped > min_fraction).float()
    return out


def _range_grad_from_sign(
    grad: Tensor, sign: Tensor, r: Tensor, decay: float, min_fraction: float
) -> Tensor:
    """Spec §2.3 from the clip sign (+1: ``x ≥ r``, -1: ``x ≤ -r``, 0: inside)."""
    total = (grad.float() * sign.float()).clamp_(max=0).sum()
    return _range_grad(total, sign.count_nonzero(), sign.numel(), r, decay, min_fraction)


def analog_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_range: Tensor,
    config: AnalogConfig,
    *,
    training: bool,
    seed: int | None = None,
    abs_max: Tensor | None = None,
    elementwise: type = TorchElementwise,
) -> Tensor:
    """The analog layer's forward (torch backend).

    ``training`` switches weight and output noise on; ``seed`` seeds this call's
    noise; ``abs_max`` optionally passes precomputed ``weight_abs_max`` statistics
    (the layer caches them in eval mode, where the weight does not change);
    ``elementwise`` picks the implementation of the elementwise chains (``afm.kernels.dispatch``
    passes the fused CPU kernels for backend "numba").
    """
    w = weight
    if config.weight_quant.bits is not None:
        w = fake_quantize_weight(w, config.weight_quant.bits, config.weight_quant.group_size)
        abs_max = None
    noisy = any(noise_in_mode(config, training))
    if not (noisy or config.input.uses_range or config.input.dynamic):
        # Nothing analog left (e.g. the `ideal` preset): exactly nn.Linear.
        return torch.nn.functional.linear(x, w, bias)
    tensors = (x, w, bias, input_range)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return AnalogLinearFunction.apply(
            x, w, bias, input_range, config, training, seed, abs_max, elementwise
        )
    return _forward(
        x, w, bias, input_range, config, training, seed, abs_max,
        save=False, elementwise=elementwise,
    )[0]  # fmt: skip
