"""The analog-aware peft LoRA layer (AHWA-LoRA) and the merge guard.

Every targeted :class:`~afm.analog.layers.AnalogLinear` is wrapped by
:class:`AnalogLoraLinear`, a subclass of ``peft.tuners.lora.Linear`` registered through
peft's custom-module extension point
(``LoraConfig._register_custom_module({AnalogLinear: AnalogLoraLinear})``), so peft never
silently treats the analog layer as a plain ``nn.Linear``.  The adapter path
``B(A(x))·scaling`` sees the *unclipped* input and runs digitally (no quantization, no
noise); merging is refused (it would re-program the chip and put the adapter under
analog noise), before anything is merged, also when some targets are plain Linear
layers.  The registration is not saved in ``adapter_config.json``:
``afm.lora.model.load_adapter`` re-registers it on load.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import nn

from afm.analog.guards import MERGE_HELP, AnalogMergeError
from afm.analog.layers import AnalogLinear

#: The peft versions whose custom-module dispatch afm relies on (same as the extra).
PEFT_MIN_VERSION = "0.15"
PEFT_MAX_VERSION = "0.23"  # exclusive
PEFT_REQUIREMENT = f"peft>={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION}"


def check_peft_version(version: str) -> None:
    """Raise ``ImportError`` unless ``PEFT_MIN_VERSION <= version < PEFT_MAX_VERSION``."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        raise ImportError(
            f"afm.lora: cannot parse the installed peft version {version!r}; "
            f"afm.lora needs {PEFT_REQUIREMENT} (pip install 'afm[peft]')"
        ) from None
    if not (Version(PEFT_MIN_VERSION) <= Version(v.base_version) < Version(PEFT_MAX_VERSION)):
        raise ImportError(
            f"afm.lora needs {PEFT_REQUIREMENT} (it relies on LoraConfig._register_custom_module "
            f"and the lora.Linear layer API of those versions), but peft {version} is installed; "
            f"install a supported version: pip install '{PEFT_REQUIREMENT}'"
        )


try:
    import peft
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"afm.lora needs peft ({PEFT_REQUIREMENT}): pip install 'afm[peft]' ({_err})"
    ) from _err

check_peft_version(peft.__version__)

__all__ = [
    "PEFT_REQUIREMENT",
    "AnalogLoraLinear",
    "AnalogMergeError",
    "PeftLoraLinear",
    "analog_lora_layers",
    "check_peft_version",
    "install_merge_guard",
    "register_analog_lora",
]


# --------------------------------------------------------------------------- the layer


class AnalogLoraLinear(PeftLoraLinear):
    """peft LoRA beside an :class:`AnalogLinear`: ``y = analog(x) + B(A(drop(x)))·s``.

    The analog base runs its own forward (clipping, quantization, and noise in
    training mode); the adapter is a plain digital ``nn.Linear`` pair that sees the
    unclipped input ``x``.  :meth:`merge` always raises :class:`AnalogMergeError`.
    Only vanilla LoRA is supported (no DoRA or other weight-merging variants, which
    read the analog weight digitally).
    """

    #: afm.analog.guards leaves layers alone that refuse merging themselves.
    afm_refuses_merge = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, AnalogLinear):
            raise TypeError(f"AnalogLoraLinear wraps AnalogLinear, got {type(base).__name__}")
        super().__init__(base_layer, adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        out = super().update_layer(adapter_name, *args, **kwargs)
        if adapter_name in getattr(self, "lora_variant", {}):
            variant = type(self.lora_variant[adapter_name]).__name__
            self.delete_adapter(adapter_name)
            raise ValueError(
                f"afm.lora supports vanilla LoRA on analog layers only; {variant} (e.g. "
                f"use_dora=True) reads the analog weight digitally and is not supported"
            )
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise AnalogMergeError(MERGE_HELP)

    def unmerge(self) -> None:  # nothing can ever be merged
        return None

    def __repr__(self) -> str:
        return "afm." + super().__repr__()


def register_analog_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`AnalogLoraLinear` for ``AnalogLinear`` on ``config`` (in place)."""
    config._register_custom_module({AnalogLinear: AnalogLoraLinear})
    return config


def analog_lora_layers(model: nn.Module) -> dict[str, AnalogLoraLinear]:
    """``{name: layer}`` of every afm LoRA layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLoraLinear)}


# --------------------------------------------------------------------------- merge guard


def _tuner(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PeftModel) else model


def _check_no_analog_merge(tuner: nn.Module, adapter_names: Sequence[str] | None) -> None:
    names = set(adapter_names) if adapter_names is not None else None
    offending = []
    for name, layer in analog_lora_layers(tuner).items():
        wanted = names if names is not None else set(layer.active_adapters)
        if wanted & set(layer.lora_A.keys()):
            offending.append(name)
    if offending:
        shown = ", ".join(offending[:3]) + (" ..." if len(offending) > 3 else "")
        raise AnalogMergeError(f"{MERGE_HELP} (analog LoRA layers: {shown}; nothing was merged)")


def _guarded_merge_and_unload(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    _check_no_analog_merge(self, kwargs.get("adapter_names"))
    return type(self).merge_and_unload(self, *args, **kwargs)


def _guarded_merge_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    adapter_names = kwargs.get("adapter_names", args[0] if args else None)
    _check_no_analog_merge(self, adapter_names)
    return type(self).merge_adapter(self, *args, **kwargs)


def install_merge_guard(model: nn.Module) -> None:
    """Check *before* merging anything, so mixed targets are never half-merged."""
    tuner = _tuner(model)
    for name, fn in (
        ("merge_and_unload", _guarded_merge_and_unload),
        ("merge_adapter", _guarded_merge_adapter),
    ):
        if hasattr(type(tuner), name):
            object.__setattr__(tuner, name, types.MethodType(fn, tuner))
