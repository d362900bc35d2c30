"""Backend choice for the analog forward: torch reference or fused Triton kernels.

This is the only afm module that imports the kernels (lazily).  The backend is
resolved once per layer and device type and logged once; nothing here reads
environment variables during a forward.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from afm import reference
from afm.config import AnalogConfig, Backend

logger = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported (checked once per process)."""
    try:
        import triton  # noqa: F401

        from afm.triton_kernels import analog_linear as _  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        logger.debug("triton backend unavailable: %s", exc)
        return False
    return True


def resolve_backend(requested: Backend, device: torch.device) -> Backend:
    """``auto`` → triton for CUDA tensors when the kernels import, else torch."""
    if requested is Backend.TORCH:
        return Backend.TORCH
    if requested is Backend.TRITON:
        if not triton_available():
            raise RuntimeError(
                "backend='triton' was requested but the Triton kernels cannot be imported; "
                "install the extra: pip install 'afm[triton]'"
            )
        return Backend.TRITON
    if device.type == "cuda" and triton_available():
        return Backend.TRITON
    return Backend.TORCH


@functools.cache
def _log_choice(backend: Backend, device_type: str) -> None:
    logger.info("afm: analog layers on %s use the %s backend", device_type, backend.value)


def analog_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_range: Tensor,
    config: AnalogConfig,
    *,
    training: bool,
    seed: int | None,
    backend: Backend,
    abs_max: Tensor | None = None,
) -> Tensor:
    """One call signature for both backends (the layer resolves ``backend`` once)."""
    _log_choice(backend, x.device.type)
    if backend is Backend.TRITON:
        from afm.triton_kernels.analog_linear import triton_analog_linear

        return triton_analog_linear(
            x, weight, bias, input_range, config, training=training, seed=seed, abs_max=abs_max
        )
    return reference.analog_linear(
        x, weight, bias, input_range, config, training=training, seed=seed, abs_max=abs_max
    )
