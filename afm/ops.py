"""Backend choice for the analog forward: torch reference, fused Triton kernels (CUDA)
or the torch path with fused numba kernels for its elementwise chains (CPU).

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


@functools.cache
def numba_available() -> bool:
    """Whether the fused CPU kernels can be imported (checked once per process)."""
    try:
        from afm import numba_kernels as _  # noqa: F401
    except Exception as exc:  # ImportError, or a numba/numpy version mismatch
        logger.debug("numba backend unavailable: %s", exc)
        return False
    return True


def resolve_backend(requested: Backend, device: torch.device) -> Backend:
    """``auto`` → triton for CUDA tensors, numba for CPU tensors, when their kernels
    import; else torch."""
    if requested is Backend.TORCH:
        return Backend.TORCH
    if requested is Backend.NUMBA:
        if not numba_available():
            raise RuntimeError(
                "backend='numba' was requested but numba cannot be imported; "
                "install the extra: pip install 'afm[cpu]'"
            )
        return Backend.NUMBA
    if requested is Backend.TRITON:
        if not triton_available():
            raise RuntimeError(
                "backend='triton' was requested but the Triton kernels cannot be imported; "
                "install the extra: pip install 'afm[triton]'"
            )
        return Backend.TRITON
    if device.type == "cuda" and triton_available():
        return Backend.TRITON
    if device.type == "cpu" and numba_available():
        return Backend.NUMBA
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
    """One call signature for all backends (the layer resolves ``backend`` once)."""
    _log_choice(backend, x.device.type)
    if backend is Backend.TRITON:
        from afm.triton_kernels.analog_linear import triton_analog_linear

        return triton_analog_linear(
            x, weight, bias, input_range, config, training=training, seed=seed, abs_max=abs_max
        )
    elementwise = reference.TorchElementwise
    if backend is Backend.NUMBA:
        from afm.numba_kernels import NumbaElementwise

        elementwise = NumbaElementwise
    return reference.analog_linear(
        x,
        weight,
        bias,
        input_range,
        config,
        training=training,
        seed=seed,
        abs_max=abs_max,
        elementwise=elementwise,
    )
