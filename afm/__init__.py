"""afm: analog foundation models for HuggingFace causal LMs.

``import afm`` also registers the transformers quantization method "afm", so
``AutoModelForCausalLM.from_pretrained(dir)`` of an afm checkpoint returns the
analog model.  It does not import triton, peft, lm_eval or vllm.
"""

from afm import hf as _hf  # noqa: F401  (registers the "afm" quantizer with transformers)
from afm.calibration import calibrate_input_ranges_
from afm.clipping import clip_callback, clip_weights_, register_clip_hook
from afm.config import (
    AnalogConfig,
    Backend,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightNoiseKind,
    WeightQuantConfig,
)
from afm.export import export_int4
from afm.hf import AfmQuantizationConfig, attach_quantization_config
from afm.layers import AnalogLinear
from afm.patch import analog_layers, convert, revert
from afm.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "AfmQuantizationConfig",
    "AnalogConfig",
    "AnalogLinear",
    "Backend",
    "ClipConfig",
    "ClipKind",
    "InputQuantConfig",
    "OutputNoiseConfig",
    "OutputQuantConfig",
    "PRESETS",
    "WeightNoiseConfig",
    "WeightNoiseKind",
    "WeightQuantConfig",
    "analog_layers",
    "attach_quantization_config",
    "calibrate_input_ranges_",
    "clip_callback",
    "clip_weights_",
    "convert",
    "export_int4",
    "get_preset",
    "register_clip_hook",
    "revert",
]
