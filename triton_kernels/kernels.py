"""Triton kernels of the analog linear layer (spec: hardware-model.md §1-4).

This module never imports afm: the launcher (``analog_linear.py``) turns the
config into plain numbers and tensors.  Three kernels:

* ``tile_absmax_kernel``: ``a[s, i] = max_{j in tile s} |W[i, j]|`` (spec §1).
* ``analog_fwd_kernel``: the fused forward.  One program owns a
  ``BLOCK_M x BLOCK_N`` output block and runs one flat loop over all tiles'
  K-blocks; each block is masked to its tile's ``[lo, hi)`` columns, so a block
  never mixes two tiles' ranges even when the tile width is not a multiple of
  ``BLOCK_K``.  Per K-block: clip and quantize x on the integer grid, (for few
  tokens) add the seeded weight noise, dot (tensor cores for fp16/bf16, fp32
  accumulation).  After a tile's last block: output noise, ADC (round, clamp to
  the bound), rescale, add to the fp32 accumulator; optionally one bit per tile
  records which outputs were past the ADC bound, for the backward.  The loop is
  flat rather than nested (tiles, then K-blocks) so that the software pipeline of
  the loads is filled once per output block, not once per tile (512-wide tiles
  are only 8 K-blocks).  Loads are pipelined (multi-stage async copies) only when
  the compiler can prove block starts and masks 16-aligned.  Equal tiles of a
  multiple of 16 columns (``ALIGNED``) mask loads to the tile.  Ragged tiles (K =
  11008 in 22 tiles of 500/501) start each tile's blocks at ``lo`` rounded down to
  16, mask loads only to ``[0, K)`` and zero the other tiles' columns of x in
  registers: pipelined too when K is a multiple of 16, at the cost of at most one
  extra K-block per tile.  Checked by
  ``tests/test_kernels.py::test_kernels_compile_for_sm90_and_pipeline``.
* ``noisy_weight_kernel``: writes ``W + σ·a·ξ`` once, bitwise the same values the
  fused kernel draws (same device function, same Philox counters): for the
  forward with many tokens and for the backward.

The arithmetic follows ``afm.reference`` expression by expression so the two
agree to fp32 rounding: static input quantization multiplies by ``1/Δ_in`` and the
ADC multiplies by ``1/step`` (both reciprocals computed by the launcher in torch,
as the reference does); the only division, dynamic mode's ``x/Δ_in``, uses
``div_rn`` (IEEE) because Triton's default fp32 ``/`` is approximate on GPUs and
would move values across rounding ties.  Rounding is ``torch.round`` (half to
even), see ``_round_half_even``.  The bias initialises the accumulator and tiles
are added in order, the reference's summation order.

Autotuning is keyed on ``(N, K, S, M_BUCKET)`` and the tensor dtypes, where
``M_BUCKET`` is the token count rounded up to a power of two (capped): the exact
token count changes at every generation step and must not trigger re-tuning.
Under ``TRITON_INTERPRET=1`` (read once, at import) autotuning is off and one
fixed, large-block config is used.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether these kernels were built for the CPU interpreter (decided at import)."""

# Input modes (constexpr IN_MODE of the forward kernel); plain ints for the launcher.
IN_NONE = 0  # no ranges: x passes unchanged
IN_CLIP = 1  # clamp to ±r, no quantization
IN_QUANT = 2  # static per-tile range r: clamp + quantize on the integer grid
IN_DYNAMIC = 3  # per-token abs-max range: quantize on the integer grid
# The same as constexpr globals: the only kind of global a compiled kernel may read.
_IN_CLIP = tl.constexpr(IN_CLIP)
_IN_QUANT = tl.constexpr(IN_QUANT)
_IN_DYNAMIC = tl.constexpr(IN_DYNAMIC)

M_BUCKET_CAP = 4096


def m_bucket(m: int) -> int:
    """The token count's autotuning bucket: next power of two, capped."""
    return min(triton.next_power_of_2(max(int(m), 1)), M_BUCKET_CAP)


# --------------------------------------------------------------------------- device helpers
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _round_half_even(x):
    """``torch.round`` (round half to even) of fp32 ``x`` with ``|x| < 2**22``, exactly.

    ``x + 1.5·2^23`` lands in ``[2^23, 2^24)`` where the fp32 spacing is 1, so the
    IEEE addition itself rounds x to the nearest integer, ties to even (1.5·2^23 is
    even); subtracting the constant back is exact.  Two instructions, no libdevice
    (``rint`` does not run in the interpreter).  Callers clamp first: inputs are
    clamped to ±n_in/2 and ADC values to ±(n_out/2 + 1), far below 2^22.  (The
    textbook ``floor(x + 0.5)`` is wrong at ties and at 0.49999997, where ``x + 0.5``
    rounds up to 1.0.)  Correct as long as the compiler does not reassociate fp
    math, which Triton never enables; the sm_90 compile test checks the constant
    survives into the PTX.
    """
    return (x + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _to_dtype_rne(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` and back to fp32 (what a ``.to(dtype)`` does).

    The interpreter's bf16 conversion truncates; with ``EMULATE_BF16`` the
    round-to-nearest-even is done on the bits (identical to the GPU's cvt.rn.bf16).
    """
    if DTYPE == tl.float32:
        return x
    else:
        if EMULATE_BF16:
            if DTYPE == tl.bfloat16:
                u = x.to(tl.uint32, bitcast=True)
                u = u + (0x7FFF + ((u >> 16) & 1))
                return ((u >> 16) << 16).to(tl.float32, bitcast=True)
            else:
                return x.to(DTYPE).to(tl.float32)
        else:
            return x.to(DTYPE).to(tl.float32)


@triton.jit
def _weight_noise(w, seed, offs_n, offs_k, K, scale, WIDE_IDX: tl.constexpr):
    """``w + ξ·scale`` with ``ξ = randn(seed, n·K + k)``: the global element index.

    Every program (and ``noisy_weight_kernel``) draws the same ξ for the same weight
    element, whatever the block sizes.  ``w`` is a ``[BLOCK_K, BLOCK_N]`` fp32 block,
    ``scale`` broadcasts to it (``σ·a`` of the element's tile and channel).
    """
    if WIDE_IDX:
        idx = offs_n[None, :].to(tl.int64) * K + offs_k[:, None].to(tl.int64)
    else:
        idx = offs_n[None, :] * K + offs_k[:, None]
    return w + tl.randn(seed, idx) * scale


@triton.jit
def _round_for_dot(x, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (the reference's ``.to(dtype)``), as a dot operand."""
    if DOT_DTYPE == DTYPE:
        return x.to(DTYPE)  # one round-to-nearest-even conversion (GPU)
    else:
        return _to_dtype_rne(x, DTYPE, EMULATE_BF16)  # fp32 holding DTYPE's value


# --------------------------------------------------------------------------- abs-max
@triton.jit
def tile_absmax_kernel(
    w_ptr,
    a_ptr,
    N,
    K,
    TILE_BASE,
    TILE_EXTRA,
    stride_wn,
    stride_wk,
    WIDE_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``a[s, n] = max_{k in tile s} |W[n, k]|`` in fp32; grid ``(cdiv(N, BLOCK_N), S)``."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    lo = s * TILE_BASE + tl.minimum(s, TILE_EXTRA)
    hi = lo + TILE_BASE + (s < TILE_EXTRA).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if WIDE_IDX:
        rows = offs_n.to(tl.int64)
    else:
        rows = offs_n
    amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = n_mask[:, None] & (offs_k[None, :] < hi)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=m, other=0.0
        ).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(w), axis=1))
    tl.store(a_ptr + s * N + offs_n, amax, mask=n_mask)


# --------------------------------------------------------------------------- noisy weight
@triton.jit
def noisy_weight_kernel(
    w_ptr,
    scale_ptr,
    out_ptr,
    seed,
    N,
    K,
    TILE_BASE,
    TILE_EXTRA,
    stride_wn,
    stride_wk,
    W_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    WIDE_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = (W + σ·a[s(k), n]·ξ).to(W_DTYPE)``, contiguous ``[N, K]``; grid over (N, K) blocks.

    ``scale_ptr`` is the ``[S, N]`` fp32 noise scale ``σ·a``.  Bitwise the noisy
    weight the forward kernel multiplied with (same ``_weight_noise``).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Tile of column k: the first TILE_EXTRA tiles have TILE_BASE + 1 columns.
    big = TILE_EXTRA * (TILE_BASE + 1)
    s_k = tl.where(
        offs_k < big, offs_k // (TILE_BASE + 1), TILE_EXTRA + (offs_k - big) // TILE_BASE
    )
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)  # [BLOCK_K, BLOCK_N]
    if WIDE_IDX:
        rows = offs_n.to(tl.int64)
    else:
        rows = offs_n
    w = tl.load(
        w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask, other=0.0
    ).to(tl.float32)
    scale = tl.load(scale_ptr + s_k[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    wn = _weight_noise(w, seed, offs_n, offs_k, K, scale, WIDE_IDX)
    wn = _to_dtype_rne(wn, W_DTYPE, EMULATE_BF16)
    tl.store(out_ptr + rows[None, :] * K + offs_k[:, None], wn, mask=mask)


# --------------------------------------------------------------------------- forward
@triton.jit
def _analog_fwd_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] or dummy
    out_ptr,  # [M, N]
    sat_ptr,  # [ceil(S/32), M, N] int32 bit masks (SAVE_MASK) or dummy
    r_ptr,  # [S] fp32 ranges (_IN_CLIP)
    unit_ptr,  # [S, M or 1] fp32 input step Δ_in (per token in dynamic mode)
    inv_ptr,  # [S, 1] fp32 1/Δ_in (static quantization: x·(1/Δ_in), as the reference)
    rpu_ptr,  # [S] fp32 r/Δ_in: n_in/2 when quantizing, r when only clipping
    step_ptr,  # [S, N] fp32 ADC step in units of Δ_in: (2·bound/n_out)·max(a, tiny)·r/Δ_in
    istep_ptr,  # [S, N] fp32 1/step
    wn_ptr,  # [S, N] fp32 σ_w·a (weight-noise scale)
    on_ptr,  # [S, N] fp32 σ_o·a (output-noise scale)
    seed_w,
    seed_o,
    M,
    N,
    K,
    S,
    TILE_BASE,
    TILE_EXTRA,
    M_BUCKET,  # only an autotuning key
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_us,
    stride_um,
    N_IN: tl.constexpr,
    N_OUT: tl.constexpr,
    IN_MODE: tl.constexpr,
    HAS_ADC: tl.constexpr,
    HAS_WNOISE: tl.constexpr,
    HAS_ONOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    X_DTYPE: tl.constexpr,  # dtype the quantized input is rounded to (the input's)
    W_DTYPE: tl.constexpr,  # dtype the noisy weight is rounded to (the weight's)
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (fp32 in the interpreter)
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    WIDE_IDX: tl.constexpr,
    ALIGNED: tl.constexpr,  # TILE_EXTRA == 0 and TILE_BASE % 16 == 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-blocks share their weight blocks in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    out_mask = m_mask[:, None] & n_mask[None, :]
    # Row / column indices for addressing: int64 once M·K, N·K or M·N reach 2^31.
    if WIDE_IDX:
        rows = offs_m.to(tl.int64)
        cols = offs_n.to(tl.int64)
    else:
        rows = offs_m
        cols = offs_n

    # The bias first, then the tiles in order: the reference's summation order.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    bits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    half_in = N_IN * 0.5
    half_out = N_OUT * 0.5
    # One flat loop over every tile's K-blocks (the load pipeline fills once per output
    # block, not once per tile).  Block j belongs to tile s and only its columns in
    # [lo, hi) count: a block never mixes two tiles, whatever the tile width.  The
    # first TILE_EXTRA tiles are one column wider than the others.
    if ALIGNED:
        n_per_tile = tl.cdiv(TILE_BASE, BLOCK_K)
    else:
        # A ragged tile [lo, hi) is covered from lo rounded down to a multiple of 16,
        # so that every block start stays provably 16-aligned: at most base + 16 columns.
        n_per_tile = tl.cdiv(TILE_BASE + 16, BLOCK_K)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, S * n_per_tile):
        s = j // n_per_tile
        b = j % n_per_tile
        last = b == n_per_tile - 1
        if ALIGNED:
            # Equal tiles of a multiple of 16 columns: lo and hi stay provably aligned
            # (TILE_BASE is specialised as divisible by 16), so the masked loads can
            # be pipelined as async copies.
            lo = s * TILE_BASE
            hi = lo + TILE_BASE
            k0 = lo + b * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hi
        else:
            # Ragged tiles: load aligned blocks masked only to [0, K) (pipelined when K
            # is a multiple of 16) and zero the columns outside [lo, hi) in registers.
            lo = s * TILE_BASE + tl.minimum(s, TILE_EXTRA)
            hi = lo + TILE_BASE + (s < TILE_EXTRA).to(tl.int32)
            k0 = (lo // 16) * 16 + b * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        # ---- DAC (§2): clip and quantize on the integer grid of this tile ----
        if IN_MODE == _IN_QUANT:
            inv_unit = tl.load(inv_ptr + s)
            xq = _round_half_even(tl.minimum(tl.maximum(x * inv_unit, -half_in), half_in))
        elif IN_MODE == _IN_DYNAMIC:
            unit_k = tl.load(unit_ptr + s * stride_us + offs_m * stride_um, mask=m_mask, other=1.0)
            xs = tl.math.div_rn(x, unit_k[:, None])
            xq = _round_half_even(tl.minimum(tl.maximum(xs, -half_in), half_in))
        elif IN_MODE == _IN_CLIP:
            r = tl.load(r_ptr + s)
            xq = tl.minimum(tl.maximum(x, -r), r)
        else:
            xq = x
        if not ALIGNED:  # the block's columns of other tiles contribute nothing
            xq = tl.where(((offs_k >= lo) & (offs_k < hi))[None, :], xq, 0.0)
        xq = _round_for_dot(xq, X_DTYPE, DOT_DTYPE, EMULATE_BF16)
        # ---- weight noise (§3), drawn here for few tokens ----
        if HAS_WNOISE:
            wscale = tl.load(wn_ptr + s * N + offs_n, mask=n_mask, other=0.0)
            w = _weight_noise(
                w.to(tl.float32), seed_w, offs_n, offs_k, K, wscale[None, :], WIDE_IDX
            )
            w = _round_for_dot(w, W_DTYPE, DOT_DTYPE, EMULATE_BF16)
        y = tl.dot(xq.to(DOT_DTYPE), w.to(DOT_DTYPE), acc=y, input_precision=DOT_PRECISION)
        # ---- the tile's last block: output noise, ADC, add to the accumulator ----
        if last:
            if IN_MODE >= _IN_QUANT:
                unit = tl.load(
                    unit_ptr + s * stride_us + offs_m * stride_um, mask=m_mask, other=1.0
                )
            else:
                unit = tl.full((BLOCK_M,), 1.0, tl.float32)
            if HAS_ONOISE:  # σ_o·a·(r/Δ_in)·ξ, a fresh stream per tile
                rpu = tl.load(rpu_ptr + s)
                oscale = tl.load(on_ptr + s * N + offs_n, mask=n_mask, other=0.0) * rpu
                xi = tl.randn(seed_o + s, rows[:, None] * N + cols[None, :])
                y = y + xi * oscale[None, :]
            if HAS_ADC:  # round(y/step), clamp to ±n_out/2, rescale by step·Δ_in
                step = tl.load(step_ptr + s * N + offs_n, mask=n_mask, other=1.0)
                istep = tl.load(istep_ptr + s * N + offs_n, mask=n_mask, other=1.0)
                # Clamp to one step past the bound first (keeps |t| < 2^22 for the
                # rounding; values past it stay past it, so the saturation bit holds).
                t = y * istep[None, :]
                t = _round_half_even(tl.minimum(tl.maximum(t, -half_out - 1.0), half_out + 1.0))
                if SAVE_MASK:
                    sat = (tl.abs(t) > half_out).to(tl.int32)
                    bits = bits | (sat << (s % 32))
                    if ((s % 32) == 31) | (s == S - 1):  # a full word, or the last tile
                        tl.store(
                            sat_ptr + ((s // 32) * M + rows)[:, None] * N + cols[None, :],
                            bits,
                            mask=out_mask,
                        )
                        bits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                t = tl.minimum(tl.maximum(t, -half_out), half_out)
                acc += t * (step[None, :] * unit[:, None])
            else:
                acc += y * unit[:, None]
            y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


def _gpu_configs() -> list[triton.Config]:
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (64, 256, 64, 4, 4),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        # decode (few tokens): thin M blocks, wide N
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (32, 128, 128, 4, 4),
    ]:
        cfgs.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=warps,
                num_stages=stages,
            )
        )
    return cfgs


INTERPRET_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
"""The one fixed config under ``TRITON_INTERPRET=1`` (tests may change it)."""

if INTERPRET:
    analog_fwd_kernel = _analog_fwd_kernel
else:
    # The sat-bit buffer is written, not accumulated, so re-running a config while
    # tuning is harmless; the output is overwritten too.
    analog_fwd_kernel = triton.autotune(configs=_gpu_configs(), key=["N", "K", "S", "M_BUCKET"])(
        _analog_fwd_kernel
    )
