"""Fused CPU kernels (numba) for the elementwise steps of the torch reference.

On CPU the analog layer's cost beyond ``nn.Linear`` is its elementwise chains —
input clamp/round with the clip sign, the ADC round/clamp with its mask, and the
two gradient maskings — each of which torch runs as several passes over the
activations.  These kernels do each chain in one vectorized pass (or, for the few
clipped inputs and saturated outputs, touch only those; docs/cpu-kernels.md).
They implement exactly the static methods of
``afm.kernels.torch_chains.TorchElementwise`` that they replace (same signatures)
and are tested against them (tests/kernels/test_numba_chains.py); the matmuls, noise
and autograd stay in ``afm.reference``.  Only fp32 tensors take the fused path;
anything else falls back to the torch chains.  Imported lazily by
``afm.kernels.dispatch`` (numba is an optional extra).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch
from numba import njit
from torch import Tensor

from afm import reference
from afm.config import WeightNoiseKind
from afm.kernels.philox import add_gaussian_noise
from afm.kernels.torch_chains import TorchElementwise

__all__ = ["NumbaElementwise"]

# Serial loops: LLVM vectorizes them (~0.25 ns per element, L2-resident), while
# numba's parallel loops measured ~5x slower here, launch overhead included.
_JIT = {"nogil": True, "cache": True}
_SCRATCH = threading.local()


def _weight_view(t: Tensor) -> np.ndarray:
    """A numpy view of a (C-contiguous fp32) weight that leaves its storage resizable:
    ``Tensor.numpy()`` pins the storage, and FSDP frees and re-gathers the storage of
    unsharded parameters between forwards ("Trying to resize storage that is not
    resizable").  The view is used only while ``t`` is alive (inside one call)."""
    if not t.is_contiguous() or t.dtype != torch.float32:
        raise ValueError(f"expected a C-contiguous float32 tensor, got {t.dtype}")
    if t.numel() == 0:
        return np.empty(tuple(t.shape), np.float32)
    buf = (ctypes.c_float * t.numel()).from_address(t.data_ptr())
    return np.frombuffer(buf, dtype=np.float32).reshape(tuple(t.shape))


def _scratch(tag: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    """A per-thread buffer for ``tag``, reused across calls and layers.

    Fresh multi-MB tensors cost a page fault per 4 KiB on first touch (glibc maps and
    unmaps them), about as much as a kernel's pass.  Every use consumes the buffer
    before the next call with the same tag: the matmul input of one forward, the
    unpacked input or the masked gradient of one backward, the ADC mask or clip signs
    until they are condensed.  One flat buffer per tag, grown to the largest request,
    so that varying shapes (prompt lengths in evaluation) do not pile up buffers.
    """
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    numel = int(np.prod(shape))
    buf = cache.get((tag, dtype))
    if buf is None or buf.numel() < numel:
        buf = cache[(tag, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


@njit(**_JIT)
def _input_kernel(x, bound, inv_unit, xq, packed, clip, save):  # pragma: no cover - jitted
    # xq: the fp32 grid values for the matmul; with save also their integer copy for
    # the backward and the clip sign.
    rows, cols = x.shape
    for i in range(rows):
        for j in range(cols):
            v = x[i, j]
            q = min(max(v, -bound), bound)
            g = np.rint(q * inv_unit)
            xq[i, j] = g
            if save:
                d = v - q
                clip[i, j] = np.int8(d > 0) - np.int8(d < 0)
                packed[i, j] = g


@njit(**_JIT)
def _adc_kernel(y, inv_step, scale, half, bias, acc, first, mask, save):  # pragma: no cover
    # first: y ← bias + q·scale in place; else acc += q·scale (acc is not y).  Each
    # unswitched loop touches one output array, so LLVM's alias checks pass.
    rows, cols = y.shape
    for i in range(rows):
        for j in range(cols):
            ys = np.rint(y[i, j] * inv_step[j])
            yc = min(max(ys, -half), half)
            if save:
                mask[i, j] = ys != yc
            if first:
                y[i, j] = bias[j] + yc * scale[j]
            else:
                acc[i, j] = acc[i, j] + yc * scale[j]


@njit(**_JIT)
def _mask_kernel(grad, mask, out):  # pragma: no cover - jitted
    rows, cols = grad.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = grad[i, j] * (1 - np.float32(mask[i, j]))


@njit(**_JIT)
def _remove_rows_(target, source, grad, flat, cols, by_row):  # pragma: no cover - jitted
    # For each saturated output (i, j) = divmod(flat[k], cols) with gradient v = grad[i, j]:
    # by_row: target[i] -= v·source[j] (input grad, source = W); else
    # target[j] -= v·source[i] (weight grad, source = x_q).
    width = target.shape[1]
    for k in range(flat.shape[0]):
        i = flat[k] // cols
        j = flat[k] - i * cols
        v = grad[i, j]
        t, src = (i, j) if by_row else (j, i)
        for c in range(width):
            target[t, c] -= v * source[src, c]


# Reassociation only for the sum (fp32 per row, vectorized; rows summed in fp64).
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _clip_grad_kernel(grad, clip):  # pragma: no cover - jitted
    rows, cols = grad.shape
    total = 0.0
    count = 0
    for i in range(rows):
        row_total = np.float32(0.0)
        row_count = 0
        for j in range(cols):
            c = np.float32(clip[i, j])
            g = grad[i, j]
            row_total += min(g * c, np.float32(0.0))
            row_count += np.int64(c != 0)
            grad[i, j] = g - c * (c * g)  # 0 exactly where clipped (c = ±1)
        total += row_total
        count += row_count
    return total, count


@njit(**_JIT)
def _flat_nonzero(a, count):  # pragma: no cover - jitted
    # np.flatnonzero for a 1-D byte array with `count` nonzeros, 8 bytes at a time
    # (np.flatnonzero measured 2.4 ms on 1.5 M mostly-zero int8; this ~0.1 ms).
    out = np.empty(count, np.int64)
    n = a.shape[0]
    words = n // 8
    packed = a[: words * 8].view(np.uint64)
    k = 0
    for i in range(words):
        if packed[i] != 0:
            for p in range(i * 8, i * 8 + 8):
                if a[p] != 0:
                    out[k] = p
                    k += 1
    for p in range(words * 8, n):
        if a[p] != 0:
            out[k] = p
            k += 1
    return out


def _nonzero(a: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the nonzero entries of a C-contiguous bool/int8 array."""
    return _flat_nonzero(a.reshape(-1).view(np.uint8), count)


@njit(**_JIT)
def _clip_grad_sparse_(grad, flat, signs):  # pragma: no cover - jitted
    # The few clipped inputs by flat index: the range-gradient sum, then zero them.
    total = 0.0
    for k in range(flat.shape[0]):
        g = grad[flat[k]] * np.float32(signs[k])
        total += min(g, np.float32(0.0))
        grad[flat[k]] = 0.0
    return total


def _vector(t: Tensor, n: int) -> np.ndarray:
    """A per-channel fp32 vector of length ``n`` from a [n] or 0-dim tensor."""
    return np.ascontiguousarray(t.detach().float().expand(n).numpy())


# A saturated output costs ~2·K multiply-adds to take back out of the two matmuls,
# against ~1 ns per output for the dense masked copy of the gradient: the sparse path
# is taken while saturated · K_in <= outputs · _SPARSE_FACTOR.
_SPARSE_FACTOR = 0.5


class Marks:
    """Marked entries of one tile's int8 clip signs or bool ADC saturation mask, kept in
    the smallest form until the backward: none, a few (flat indices and their values)
    or many (the tensor itself)."""

    # Marks kept as indices (8 bytes + the value each) up to this share of the entries.
    _INDEX_SHARE = 1 / 64

    def __init__(self, marks: np.ndarray) -> None:
        self.shape, self.dtype = marks.shape, torch.from_numpy(marks[:0]).dtype
        self.count = int(np.count_nonzero(marks))
        self.flat: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.tensor: Tensor | None = None
        if 0 < self.count <= marks.size * self._INDEX_SHARE:
            self.flat = _nonzero(marks, self.count)
            self.values = marks.reshape(-1)[self.flat]
        elif self.count:
            self.tensor = torch.from_numpy(marks.copy())

    def dense(self) -> Tensor:
        if self.tensor is not None:
            return self.tensor
        dense = torch.zeros(self.shape, dtype=self.dtype)
        if self.flat is not None:
            dense.view(-1)[torch.from_numpy(self.flat)] = torch.from_numpy(self.values)
        return dense


class SparseADCGrad:
    """The few saturated outputs of one tile, to take back out of ``g @ W`` and ``gᵀ x_q``.

    Equivalent to zeroing them in ``g`` before both matmuls, up to fp32 rounding of the
    removed products.
    """

    def __init__(self, grad: Tensor, flat: np.ndarray) -> None:
        self.grad, self.flat = grad.detach().numpy(), flat

    def remove_from_weight_grad_(self, grad_w: Tensor, x_q: Tensor) -> None:
        cols = self.grad.shape[1]
        _remove_rows_(grad_w.numpy(), x_q.numpy(), self.grad, self.flat, cols, False)

    def remove_from_input_grad_(self, grad_x: Tensor, weight: Tensor) -> None:
        cols = self.grad.shape[1]
        w = weight.detach().contiguous()
        _remove_rows_(grad_x.numpy(), _weight_view(w), self.grad, self.flat, cols, True)


_SEED_HIGH = 2**62


class NumbaElementwise:
    """Fused replacements for ``TorchElementwise`` (fp32 CPU tensors), plus the weight
    noise from a counter-based generator (``afm.kernels.philox``)."""

    @staticmethod
    def noisy_weight(
        weight: Tensor,
        a: Tensor,
        bounds: list[tuple[int, int]],
        kind: WeightNoiseKind,
        std: float,
        generator: torch.Generator | None,
        seed: int | None,
    ) -> Tensor:
        """``reference.noisy_weight`` with ξ from the Philox stream of ``seed`` (drawn
        from torch's generator when None): the same distribution, ~0.8 ns per element on
        one thread instead of randn's ~2.9, and the same numbers for any thread count."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return reference.noisy_weight(weight, a, bounds, kind, std, generator)
        if seed is None:
            seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=generator).item())
        if kind is WeightNoiseKind.ADD_GAUSS_PER_CHANNEL:
            scale = a  # [S, N]
        else:
            scale = a.amax(dim=1, keepdim=True).expand_as(a)
        scale = np.ascontiguousarray((std * scale.detach().float()).numpy())
        edges = np.array([lo for lo, _ in bounds] + [bounds[-1][1]], np.int64)
        w = weight.detach().contiguous()
        noisy = add_gaussian_noise(_weight_view(w), scale, edges, seed, torch.get_num_threads())
        return torch.from_numpy(noisy)

    @staticmethod
    def quantize_static_input(
        x: Tensor, r: Tensor, unit: Tensor | None, *, save: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The torch chain's result, with the grid values for the backward kept as
        int8 (int16 past 8 bits): 2 bytes per input with the clip sign, not 5, and the
        fp32 matmul input in a scratch buffer instead of fresh memory."""
        if unit is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return TorchElementwise.quantize_static_input(x, r, unit, save=save)
        bound = np.float32(torch.nextafter(r, torch.zeros_like(r)).item())
        inv_unit = np.float32((1.0 / unit).item())
        half = float(np.rint(bound * inv_unit))  # the grid's largest value, n/2
        if half > np.iinfo(np.int16).max:  # more input bits than an int16 holds
            return TorchElementwise.quantize_static_input(x, r, unit, save=save)
        packed_dtype = torch.int8 if half <= np.iinfo(np.int8).max else torch.int16
        xq = _scratch("input", x.shape)  # consumed by this forward's matmul
        empty = (0, 0)
        packed = torch.empty(x.shape if save else empty, dtype=packed_dtype)
        clip = (
            _scratch("clip", x.shape, torch.int8) if save else torch.empty(empty, dtype=torch.int8)
        )
        _input_kernel(
            x.detach().numpy(), bound, inv_unit, xq.numpy(), packed.numpy(), clip.numpy(), save
        )
        if not save:
            return xq, None, None
        return xq, packed, Marks(clip.numpy())

    @staticmethod
    def unpack_input(saved: Tensor) -> Tensor:
        if saved.dtype.is_floating_point:  # saved by a torch chain
            return saved
        # consumed by this backward's weight-gradient matmul (and its sparse correction)
        return _scratch("unpacked input", saved.shape).copy_(saved)

    @staticmethod
    def adc_accumulate(
        y: Tensor,
        step: Tensor,
        unit: Tensor,
        n_out: int,
        out: Tensor | None,
        bias: Tensor | None,
        *,
        save: bool,
    ) -> tuple[Tensor, Marks | None]:
        if (
            y.dtype != torch.float32
            or y.device.type != "cpu"
            or not y.is_contiguous()
            or unit.dim() != 0  # dynamic ranges: one unit per token
        ):
            return TorchElementwise.adc_accumulate(y, step, unit, n_out, out, bias, save=save)
        cols = y.shape[1]
        inv_step = _vector(1.0 / step, cols)
        scale = _vector(step * unit, cols)
        first = out is None
        bias_v = np.zeros(cols, np.float32) if bias is None else _vector(bias, cols)
        target = y if first else out
        mask = (
            _scratch("adc mask", y.shape, torch.bool)
            if save
            else torch.empty((0, 0), dtype=torch.bool)
        )
        _adc_kernel(
            y.numpy(),
            inv_step,
            scale,
            np.float32(n_out / 2),
            bias_v,
            target.numpy(),
            first,
            mask.numpy(),
            save,
        )
        # Condensed apart: a count inside the kernel's loop stops its vectorization.
        return target, (Marks(mask.numpy()) if save else None)

    @staticmethod
    def mask_adc_grad(
        grad: Tensor, mask: Tensor | Marks, in_features: int
    ) -> tuple[Tensor, SparseADCGrad | None]:
        if isinstance(mask, Marks):
            if mask.count == 0:
                return grad, None
            sparse_pays = mask.count * in_features <= grad.numel() * _SPARSE_FACTOR
            if mask.flat is not None and sparse_pays and grad.dtype == torch.float32:
                return grad, SparseADCGrad(grad, mask.flat)
            mask = mask.dense()
        if grad.dtype != torch.float32 or grad.device.type != "cpu":
            return TorchElementwise.mask_adc_grad(grad, mask, in_features)
        out = _scratch("adc grad", grad.shape)  # consumed by this backward's two matmuls
        _mask_kernel(grad.detach().numpy(), mask.numpy(), out.numpy())
        return out, None

    @staticmethod
    def mask_clipped_grad_(
        grad: Tensor, clip: Tensor | Marks, *, count: bool
    ) -> tuple[Tensor, Tensor | None]:
        fused = grad.dtype == torch.float32 and grad.device.type == "cpu" and grad.is_contiguous()
        if isinstance(clip, Marks):
            if fused and clip.tensor is None:  # none or a few clipped: touch only those
                total = 0.0
                if clip.flat is not None:
                    total = _clip_grad_sparse_(grad.view(-1).numpy(), clip.flat, clip.values)
                n_clipped = torch.tensor(clip.count, dtype=torch.int64) if count else None
                return torch.tensor(total, dtype=torch.float32), n_clipped
            clip = clip.dense()
        if not fused:
            return TorchElementwise.mask_clipped_grad_(grad, clip, count=count)
        total, n = _clip_grad_kernel(grad.numpy(), clip.numpy())
        n_clipped = torch.tensor(n, dtype=torch.int64) if count else None
        return torch.tensor(total, dtype=torch.float32), n_clipped
