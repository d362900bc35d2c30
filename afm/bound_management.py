"""Iterative bound management of the ADC (spec §4.3) in plain torch.

aihwkit's ``BoundManagementType.ITERATIVE`` (``src/aihwkit/simulator/tiles/analog_mvm.py``,
``AnalogMVM.matmul`` lines 118-167 and ``_finalize_output`` lines 250-275; the same loop
per input vector in ``src/rpucuda/rpu_forward_backward_pass.cpp`` lines 938-981): when an
output of the MVM lands past the ADC bound, the MVM is run again with the inputs scaled
down by a reduction factor 2, 4, 8 ... (fresh output noise every round) and the result
is scaled back up digitally; it stops when nothing saturates or once the factor exceeds
``min(max_bm_factor, max_bm_res / inp_res)``, ``inp_res = 2 / n_in`` the input step in
units of the (per-token abs-max) input range.

In afm's integer-grid arithmetic (``afm.reference``) a reduction ``f`` of a token is its
dynamic range times ``f``: ``unit = 2·r·f/n_in``; the noise, the ADC step and the bound in
grid units do not change.  afm tests each token of each tile on its own (a chip runs one
MVM per token, as ``forwardVector`` does); aihwkit's torch tile tests the whole batch at
once (``.all()`` at analog_mvm.py:270), so a token there is re-run when any token of its
batch saturates.  With one token per batch the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from afm.config import AnalogConfig, BoundManagement

__all__ = ["bound_management_limit", "iterative", "output_noise", "rerun_saturated"]


def iterative(config: AnalogConfig) -> bool:
    """Whether the ADC of ``config`` uses iterative bound management."""
    return config.output.bound_management is BoundManagement.ITERATIVE


def bound_management_limit(config: AnalogConfig) -> float:
    """A token is re-run (factor doubled) only while its factor is at most this."""
    n_in = 2**config.input.bits - 2
    return min(float(config.output.max_bm_factor), config.output.max_bm_res * n_in / 2)


def output_noise(gen: torch.Generator | None, scale: Tensor) -> Callable[[Tensor], Tensor]:
    """``y ↦ y + scale·ξ`` in place, a fresh ξ per call (spec §4.1: each round of the
    bound management reads the tile again, with new noise)."""

    def add(y: Tensor) -> Tensor:
        xi = torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32)
        return y.addcmul_(xi, scale)

    return add


def _saturated(y: Tensor, inv_step: Tensor, half: float) -> Tensor:
    """Row indices of ``y`` with an output past the ADC bound (the ADC's own rounding)."""
    return (torch.round(y * inv_step).abs() > half).any(dim=1).nonzero().squeeze(1)


def rerun_saturated(
    xf: Tensor,
    r: Tensor,
    weight: Tensor,
    y: Tensor,
    xq: Tensor,
    unit: Tensor,
    *,
    step: Tensor,
    n_in: int,
    n_out: int,
    limit: float,
    noise: Callable[[Tensor], Tensor] | None,
) -> None:
    """Re-run the tokens of one tile whose outputs saturate, in place.

    ``xf`` [M, K] fp32 tile input, ``r`` [M, 1] its per-token abs-max, ``weight`` [N, K] the
    (noisy) tile weight; ``y`` [M, N] fp32 the first round's MVM in grid units (noise
    added), ``xq`` [M, K] its grid input (in the matmul dtype) and ``unit`` [M, 1] its
    input step: rows of the re-run tokens are replaced by their last round.  ``step``:
    the ADC step in grid units; ``noise(y)`` adds a fresh output-noise draw to ``y``.
    """
    inv_step, half = 1.0 / step, n_out / 2
    factor = torch.ones_like(r)
    rows = _saturated(y, inv_step, half)
    while rows.numel():
        rows = rows[factor[rows, 0] <= limit]
        if not rows.numel():
            break
        factor[rows] *= 2
        u = 2 * r[rows] * factor[rows] / n_in
        q = torch.round(xf[rows] / u).to(xq.dtype)
        y_rows = (q @ weight.t()).float()
        if noise is not None:
            y_rows = noise(y_rows)
        xq[rows], unit[rows], y[rows] = q, u, y_rows
        rows = rows[_saturated(y_rows, inv_step, half)]
