"""afm: analog foundation models for HuggingFace causal LMs.

``import afm`` also registers the transformers quantization method "afm", so
``AutoModelForCausalLM.from_pretrained(dir)`` of an afm checkpoint returns the
analog model (and refuses an analog checkpoint whose chip is missing or damaged), and
makes peft's stock adapter layers refuse merging into analog weights.  Without
``import afm``, transformers loads an afm checkpoint as a *digital* model with only a log
line.  It does not import triton, peft, lm_eval, vllm, numba, trl or deepspeed.

The package, one layer of the architecture per folder (docs/design.md): ``config`` /
``presets`` / ``reference`` (the chip as data and as math), ``kernels`` (the op's
backends), ``analog`` (the chip on a model), ``training``, ``lora``, ``evaluate``,
``export``, ``toyworld`` (the embedded tiny world) and ``cli``.
"""

from afm.analog import guards as _guards  # noqa: F401  (stock peft merges, load checks)
from afm.analog.calibration import calibrate_input_ranges_
from afm.analog.clipping import clip_callback, clip_weights_, register_clip_hook
from afm.analog.convert import AlreadyAnalogError, analog_layers, convert, revert, set_chip
from afm.analog.hf import AfmQuantizationConfig, attach_quantization_config
from afm.analog.layers import AnalogLinear
from afm.analog.select import PatternMatchError
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
from afm.export.int4 import export_int4
from afm.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "AfmQuantizationConfig",
    "AlreadyAnalogError",
    "AnalogConfig",
    "AnalogLinear",
    "Backend",
    "ClipConfig",
    "ClipKind",
    "InputQuantConfig",
    "OutputNoiseConfig",
    "OutputQuantConfig",
    "PRESETS",
    "PatternMatchError",
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
    "set_chip",
]
