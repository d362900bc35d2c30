"""Backend choice for the analog forward: torch reference, fused Triton kernels (CUDA)
or the torch path with fused numba kernels for its elementwise chains (CPU).

This is the only afm module that imports the fused kernels (lazily).  The backend is
resolved once per layer and device type and logged once; nothing here reads
environment variables during a forward.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
from torch import Tensor

from afm import reference
from afm.bound_management import iterative
from afm.config import AnalogConfig, Backend
from afm.kernels.torch_chains import TorchElementwise

logger = logging.getLogger(__name__)


@functools.cache
def _importable(module: str) -> bool:
    """Whether ``module`` imports (checked once per process and module)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install / version mismatch
        logger.debug("%s unavailable: %s", module, exc)
        return False
    return True


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (checked once per process)."""
    return _importable("afm.triton_kernels.analog_linear")


def numba_available() -> bool:
    """Whether the fused CPU kernels can be imported (checked once per process)."""
    return _importable("afm.kernels.numba_chains")


def triton_unsupported(config: AnalogConfig | None) -> str | None:
    """What of ``config`` the Triton kernels cannot simulate yet (None: nothing)."""
    if config is not None and iterative(config):
        return "output.bound_management='iterative'"
    return None


def resolve_backend(
    requested: Backend, device: torch.device, config: AnalogConfig | None = None
) -> Backend:
    """``auto`` → triton for CUDA tensors, numba for CPU tensors, when their kernels
    import (and, for triton, can run ``config``); else torch."""
    if requested is Backend.TORCH:
        return Backend.TORCH
    missing = triton_unsupported(config)
    if requested is Backend.TRITON and missing:
        raise RuntimeError(
            f"backend='triton' cannot simulate {missing} yet; use backend='torch' or 'auto'"
        )
    if requested is not Backend.AUTO:  # an explicit kernel backend must be there
        available, what, extra = {
            Backend.TRITON: (triton_available, "the Triton kernels", "triton"),
            Backend.NUMBA: (numba_available, "numba", "cpu"),
        }[requested]
        if not available():
            raise RuntimeError(
                f"backend={requested.value!r} was requested but {what} cannot be imported; "
                f"install the extra: pip install 'afm[{extra}]'"
            )
        return requested
    if device.type == "cuda" and triton_available():
        if not missing:
            return Backend.TRITON
        logger.info("afm: the triton backend cannot simulate %s: torch instead", missing)
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
    elementwise: type = TorchElementwise
    if backend is Backend.NUMBA:
        from afm.kernels.numba_chains import NumbaElementwise

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
