"""The analog layer's elementwise chains in torch (backend ``torch``).

Input quantization with its clip sign, the ADC with its saturation mask, and the
two gradient masks, written for speed on CPU: blocks of rows that stay in L2, float
passes instead of bool comparisons.  ``afm.reference`` calls these for the whole
layer, and they are the oracle the fused CPU kernels (``afm.kernels.numba_chains``,
same static methods) are tested against.  Imports nothing from afm.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TorchElementwise"]


# Elementwise chains run over blocks of rows on CPU: each block (~256 KiB of fp32)
# stays in L2 across the chain's passes, where whole-tensor passes would each stream
# the activations through DRAM (measured ~2.5x slower for the input path at 2048x768).
_BLOCK_ELEMENTS = 1 << 16


def _row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    """Row slices for the elementwise chains: blocks on CPU, one slice on accelerators."""
    if device.type != "cpu" or rows * cols <= _BLOCK_ELEMENTS:
        return [slice(0, rows)]
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class TorchElementwise:
    """The layer's elementwise chains in torch: the oracle the fused CPU kernels
    (``afm.kernels.numba_chains.NumbaElementwise``, same static methods) are tested
    against."""

    @staticmethod
    def quantize_static_input(
        x: Tensor, r: Tensor, unit: Tensor | None, *, save: bool
    ) -> tuple[Tensor, None, Tensor | None]:
        """Spec §2.1-2.2 with a static range ``r``: ``(round(clamp(x, ±r)/unit), None,
        clip sign)``.  The middle slot is for kernels that keep a compact copy of the
        grid values for the backward (``unpack_input`` restores it); here the backward
        keeps the result itself.

        ``unit=None``: no quantization, ``clamp(x, ±r)`` itself.  The clip sign (int8: +1
        where ``x ≥ r``, -1 where ``x ≤ -r``, else 0) comes from clamping at r⁻, the largest
        float below r: ``x - clamp(x, ±r⁻)`` is > 0 exactly where x ≥ r and < 0 exactly
        where x ≤ -r, so float passes do the work of two slower bool comparisons.  Since
        ``round(r⁻/unit) = n/2 = round(r/unit)`` the grid values equal clamping at r.
        """
        r_in = torch.nextafter(r, torch.zeros_like(r))
        bound = r if unit is None else r_in
        inv_unit = None if unit is None else 1.0 / unit
        xq = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        clip = torch.empty(x.shape, dtype=torch.int8, device=x.device) if save else None
        for rows in _row_blocks(x.shape[0], x.shape[1], x.device):
            xs, q = x[rows].float(), xq[rows]
            torch.minimum(xs, bound, out=q)
            torch.maximum(q, -bound, out=q)
            if clip is not None:
                edge = q if unit is not None else torch.maximum(torch.minimum(xs, r_in), -r_in)
                clip[rows] = torch.sub(xs, edge).sign_()
            if inv_unit is not None:
                q.mul_(inv_unit).round_()
        return xq, None, clip

    @staticmethod
    def unpack_input(saved: Tensor) -> Tensor:
        """The matmul input the backward needs, from what the forward saved (itself)."""
        return saved

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
    ) -> tuple[Tensor, Tensor | None]:
        """Spec §4.2 on ``y`` (fp32, in input units, consumed), added into ``out``.

        ``out + clamp(round(y/step), ±n/2)·step·unit (+ bias when out is None)``; with
        ``save`` also the bool mask of outputs past the ADC bound (they get no gradient):
        ``round(y/step) - clamp(...)`` is nonzero exactly there.
        """
        half = n_out / 2
        inv_step, scale = 1.0 / step, step * unit
        bias_f = None if bias is None else bias.float()
        first = out is None
        if first:
            out = y  # written in place, block by block
        mask = torch.empty(y.shape, dtype=torch.bool, device=y.device) if save else None
        per_row = unit.dim() == 2  # dynamic ranges: one unit per token, [M, 1]
        for rows in _row_blocks(y.shape[0], y.shape[1], y.device):
            ys = y[rows].mul_(inv_step).round_()
            if mask is not None:
                yc = torch.clamp(ys, -half, half)
                torch.ne(ys, yc, out=mask[rows])
            else:
                yc = ys.clamp_(-half, half)
            sc = scale[rows] if per_row else scale
            if not first:
                out[rows].addcmul_(yc, sc)
            elif bias_f is not None:
                torch.addcmul(bias_f, yc, sc, out=out[rows])
            else:
                torch.mul(yc, sc, out=out[rows])
        return out, mask

    @staticmethod
    def mask_adc_grad(grad: Tensor, mask: Tensor, in_features: int) -> tuple[Tensor, None]:
        """``grad`` with zeros where ``mask`` (outputs past the ADC bound), as a new tensor.

        ``g - g·mask`` in float passes, block by block (``masked_fill`` is ~4x slower on
        CPU).  The second result is for kernels that return ``grad`` itself plus a sparse
        correction (``remove_from_weight_grad_`` / ``remove_from_input_grad_``, whose cost
        grows with the tile's ``in_features``); never here.
        """
        out = torch.empty_like(grad)
        for rows in _row_blocks(grad.shape[0], grad.shape[1], grad.device):
            m = mask[rows].view(torch.int8).to(grad.dtype)
            torch.addcmul(grad[rows], grad[rows], m, value=-1, out=out[rows])
        return out, None

    @staticmethod
    def mask_clipped_grad_(
        grad: Tensor, clip: Tensor, *, count: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Zero ``grad`` in place where the input was clipped; return the §2.3 sums.

        Returns ``Σ min(sign·g, 0)`` (fp32; ``= Σ_{x≥r} min(g, 0) − Σ_{x≤−r} max(g, 0)``) and,
        with ``count``, the number of clipped inputs.  One block-wise chain: ``sign·g``,
        ``g − sign·(sign·g)`` (0 exactly where clipped), the clamped sum.
        """
        total = torch.zeros((), dtype=torch.float32, device=grad.device)
        n_clipped = torch.zeros((), dtype=torch.int64, device=grad.device) if count else None
        for rows in _row_blocks(grad.shape[0], grad.shape[1], grad.device):
            c = clip[rows]
            sign = c.to(grad.dtype)
            signed = grad[rows] * sign
            grad[rows].addcmul_(signed, sign, value=-1)
            total += signed.clamp_(max=0).sum(dtype=torch.float32)
            if n_clipped is not None:
                n_clipped += c.count_nonzero()
        return total, n_clipped
