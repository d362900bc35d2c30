"""Load-time checks: an afm checkpoint never loads as a silently digital, NaN or zero-range model.

Two places in ``from_pretrained`` are checked:

* **the key report** — :func:`check_input_range_keys` sees the checkpoint's missing and
  unexpected keys.  An ``input_range`` tensor nobody expects means an analog checkpoint
  whose ``config.json`` lost (or never had) its afm ``quantization_config``: transformers
  would load it as a digital model with different logits, so this is an error.  A
  missing ``input_range`` of an analog layer would load as 0 (NaN logits): an error too,
  unless a plain checkpoint is being converted on the fly (then it is initialised).
* **the loaded tensors** — :func:`check_loaded_tensors`: finite weights, biases and
  ranges, and positive ranges where the chip uses them.

Why a wrapper: without a quantization config in ``config.json`` transformers calls no
quantizer, so nothing of afm runs during such a load.  What always runs is
``PreTrainedModel._adjust_missing_and_unexpected_keys(self, loading_info)``, called once
per load by ``_finalize_model_loading`` (transformers 5.x, ``modeling_utils.py``) after the
weights are in place and before the load report is logged, with the checkpoint's raw
``loading_info.missing_keys`` / ``unexpected_keys``.  :func:`install_key_checks` wraps
that method (once; :mod:`afm.analog.guards` calls it as soon as transformers' modeling
code is loaded, which ``import afm`` itself must not import) so the check runs first and
then transformers' own adjustment; an exception propagates out of ``from_pretrained``
(the report is still logged by transformers' ``finally``).  If a transformers version
lacks the method or its signature differs, a warning says that this protection is off.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from afm.analog.layers import AnalogLinear, analog_layers

logger = logging.getLogger(__name__)

__all__ = [
    "LOAD_CONTEXT_ATTR",
    "DamagedCheckpointError",
    "LoadContext",
    "MissingChipError",
    "check_input_range_keys",
    "check_loaded_tensors",
    "install_key_checks",
]

#: Attribute the afm quantizer sets on a model while it loads (removed afterwards).
LOAD_CONTEXT_ATTR = "_afm_load_context"
_RANGE = "input_range"


class MissingChipError(ValueError):
    """Analog weights (``input_range`` tensors) without an afm quantization config."""


class DamagedCheckpointError(ValueError):
    """An afm checkpoint whose tensors are missing, non-finite or out of range."""


@dataclass(frozen=True)
class LoadContext:
    """What the afm quantizer knows about the load in progress."""

    converting: bool  # a plain checkpoint converted on the fly (it holds no input_range)
    files: tuple[str, ...]  # the checkpoint's weight files


def _is_range_key(key: str) -> bool:
    return key == _RANGE or key.endswith("." + _RANGE)


def _source(model: nn.Module, context: LoadContext | None) -> str:
    if context is not None and len(context.files) == 1:
        return f"checkpoint file {context.files[0]}"
    if context is not None and context.files:
        return f"checkpoint {Path(context.files[0]).parent}"
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or "<unknown>"
    return f"checkpoint {path}"


def _shown(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(repr(k) for k in keys[:3]) + more


def check_input_range_keys(
    model: nn.Module, missing_keys: Iterable[str], unexpected_keys: Iterable[str]
) -> None:
    """Raise for ``input_range`` tensors the model does not expect, or analog layers whose
    ``input_range`` is not in the checkpoint; initialise them when converting on the fly."""
    context: LoadContext | None = getattr(model, LOAD_CONTEXT_ATTR, None)
    stray = sorted(k for k in unexpected_keys if _is_range_key(k))
    if stray and context is None:
        raise MissingChipError(
            f"{_source(model, None)} holds {len(stray)} input_range tensors ({_shown(stray)}): "
            "it is an analog checkpoint, but its config.json has no afm quantization_config, "
            "so it would load as a digital model with different logits. Fix: re-save it from "
            "the analog model (after `import afm`, model.save_pretrained writes the chip), or "
            'add "quantization_config": afm.AfmQuantizationConfig.from_model(analog_model)'
            ".to_dict() to its config.json, or pass quantization_config="
            "afm.AfmQuantizationConfig(<its chip>) to from_pretrained"
        )
    if stray:
        raise DamagedCheckpointError(
            f"{_source(model, context)} holds input_range tensors of layers that its afm "
            f"quantization_config does not list as analog ({_shown(stray)}): the config and "
            "the weights disagree"
        )
    lost = sorted(k for k in missing_keys if _is_range_key(k))
    if not lost:
        return
    if context is None or not context.converting:
        raise DamagedCheckpointError(
            f"{_source(model, context)} lacks the input_range tensors of {len(lost)} analog "
            f"layers ({_shown(lost)}); they would load as 0 and give NaN logits. The "
            "checkpoint is damaged: re-save it from the analog model"
        )
    _initialise_ranges(model, lost)


@torch.no_grad()
def _initialise_ranges(model: nn.Module, keys: Sequence[str]) -> None:
    """Converting a plain checkpoint: its ranges start at the chip's ``init_value``."""
    for key in keys:
        layer = model.get_submodule(key.rpartition(".")[0])
        if isinstance(layer, AnalogLinear) and layer.input_range.device.type != "meta":
            layer.input_range.fill_(layer.analog_config.input.init_value)


def _file_holding(tensor: str, files: Sequence[str]) -> str:
    if len(files) > 1:
        from safetensors import safe_open

        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(f, framework="pt") as handle:
                    if tensor in handle.keys():
                        return f
    return files[0] if files else "<unknown file>"


def check_loaded_tensors(model: nn.Module, files: Sequence[str] = ()) -> None:
    """Every analog layer's weight, bias and ``input_range`` is finite, and its ranges are
    positive where the chip uses them (a zero range divides by zero)."""
    for name, layer in analog_layers(model).items():
        tensors = {"weight": layer.weight, "bias": layer.bias, _RANGE: layer.input_range}
        for suffix, tensor in tensors.items():
            if tensor is None or tensor.device.type == "meta":
                continue
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                key = f"{name}.{suffix}"
                raise DamagedCheckpointError(
                    f"{_file_holding(key, files)}: tensor {key!r} holds {bad} non-finite "
                    f"values (NaN or inf) of {tensor.numel()}; the checkpoint is damaged"
                )
        r = layer.input_range.detach()
        if layer.analog_config.input.uses_range and r.device.type != "meta" and (r <= 0).any():
            key = f"{name}.{_RANGE}"
            raise DamagedCheckpointError(
                f"{_file_holding(key, files)}: tensor {key!r} holds a non-positive input "
                f"range ({float(r.min()):g}); ranges must be > 0 (the checkpoint is damaged)"
            )


def install_key_checks() -> None:
    """Run :func:`check_input_range_keys` in every ``from_pretrained`` (see the module doc)."""
    from transformers.modeling_utils import PreTrainedModel

    original = getattr(PreTrainedModel, "_adjust_missing_and_unexpected_keys", None)
    if original is None or getattr(original, "afm_key_checks", False):
        if original is None:
            logger.warning(_UNSUPPORTED, "it has no _adjust_missing_and_unexpected_keys")
        return
    if list(inspect.signature(original).parameters) != ["self", "loading_info"]:
        logger.warning(_UNSUPPORTED, "_adjust_missing_and_unexpected_keys has another signature")
        return

    @functools.wraps(original)
    def adjust_missing_and_unexpected_keys(self: nn.Module, loading_info: object) -> None:
        check_input_range_keys(
            self,
            getattr(loading_info, "missing_keys", ()),
            getattr(loading_info, "unexpected_keys", ()),
        )
        return original(self, loading_info)

    adjust_missing_and_unexpected_keys.afm_key_checks = True  # type: ignore[attr-defined]
    PreTrainedModel._adjust_missing_and_unexpected_keys = adjust_missing_and_unexpected_keys


_UNSUPPORTED = (
    "afm: this transformers version is not supported by afm's load checks (%s): an analog "
    "checkpoint without its afm quantization_config will load as a digital model unnoticed"
)
