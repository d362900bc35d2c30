"""Process-wide guards that ``import afm`` installs, through one documented torch hook.

torch calls a global module-registration hook
(``torch.nn.modules.module.register_module_module_registration_hook``) every time a
module is assigned as the child of another.  afm uses it for two things that no
transformers or peft hook covers:

* **Stock peft adapters never merge into analog weights.**  ``afm.lora`` wraps analog
  layers in its own LoRA layer, which refuses merging.  A plain
  ``peft.get_peft_model(analog_model, LoraConfig(...))`` gets peft's stock layer instead
  (peft 0.21 has no global dispatch registry: its custom-module mapping lives on each
  ``LoraConfig``), whose ``merge_and_unload()`` would add the digital adapter's delta to
  the analog weights — clipped, quantized and noisy on the chip: different logits.  When
  a peft tuner layer (LoRA, IA3, LoHa, ... — any ``BaseTunerLayer``) takes an
  ``AnalogLinear`` as its ``base_layer``, that layer instance gets a ``merge`` that raises
  :class:`AnalogMergeError`.  Every peft merge path (``merge_and_unload``,
  ``merge_adapter``, ``safe_merge``) calls the layer's ``merge``; ``unload()`` and
  ``disable_adapter()`` keep working.  Layers that refuse merging themselves
  (``afm.lora``'s) set ``afm_refuses_merge = True``.
* **The load-time key checks** (:mod:`afm.analog.load_checks`) patch
  ``transformers.modeling_utils``, which ``import afm`` must not import (it pulls in
  triton).  They are installed the first time a module is built while that module is
  loaded — always before a ``from_pretrained`` loads weights, since the model is built
  first.

Neither peft nor ``transformers.modeling_utils`` is imported here: the hook only looks
for them in ``sys.modules``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from afm.analog.layers import AnalogLinear
from afm.analog.load_checks import install_key_checks

__all__ = ["MERGE_HELP", "AnalogMergeError", "refuse_merge_"]


class AnalogMergeError(RuntimeError):
    """Merging an adapter into analog weights was requested (always refused)."""


MERGE_HELP = (
    "merging a LoRA adapter into analog weights is refused: it would re-program the "
    "chip (slow, wears the devices) and put the adapter's delta under clipping, "
    "quantization and analog noise. Keep the adapter digital (it runs beside the analog "
    "layer), use unload() to get the analog base back, or disable_adapter() to run "
    "without it. To merge into a digital model, revert first: afm.revert(base) on the "
    "unloaded model, then attach and merge there."
)


def _refused_merge(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise AnalogMergeError(
        f"{MERGE_HELP} (a stock peft {type(self).__name__} layer wraps an AnalogLinear; "
        "afm.lora.attach_lora gives afm's analog-aware layer)"
    )


def refuse_merge_(layer: nn.Module) -> None:
    """Make ``layer.merge`` raise :class:`AnalogMergeError` (this instance only)."""
    object.__setattr__(layer, "merge", types.MethodType(_refused_merge, layer))


def _peft_tuner_layer_class() -> type | None:
    module = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(module, "BaseTunerLayer", None)


_key_checks_installed = False


def _on_child_registered(parent: nn.Module, name: str, child: Any) -> None:
    global _key_checks_installed
    if not _key_checks_installed and "transformers.modeling_utils" in sys.modules:
        install_key_checks()
        _key_checks_installed = True
    if name != "base_layer" or not isinstance(child, AnalogLinear):
        return None  # the common case, decided without looking further
    tuner = _peft_tuner_layer_class()
    if tuner is not None and isinstance(parent, tuner):
        if not getattr(type(parent), "afm_refuses_merge", False):
            refuse_merge_(parent)
    return None


# Once per process: importlib.reload re-runs this file in the same namespace, which
# still holds the handle of the hook registered the first time.
if "_HOOK_HANDLE" not in globals():
    _HOOK_HANDLE = register_module_module_registration_hook(_on_child_registered)
