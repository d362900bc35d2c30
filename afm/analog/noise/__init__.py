"""Deployment (inference-time) noise: program a trained model onto a simulated chip.

Spec: ``hardware-model.md`` §5.  Noise models (``models``), the drift evaluation times
(``durations``) and applying a model to a network in place, reversibly (``apply``).
"""

from afm.analog.noise.apply import (
    NoiseHandle,
    apply_noise,
    apply_noise_,
    layer_seed,
    seeded_noise,
    seeded_read_noise,
    select_noise_layers,
)
from afm.analog.noise.durations import DRIFT_TIMES, format_duration, parse_duration
from afm.analog.noise.models import (
    NOISE_MODELS,
    GaussianWeightNoise,
    NoiseModel,
    PCMDeviceState,
    PCMDriftNoise,
    PCMProgrammingNoise,
    get_noise_model,
    noise_model_from_dict,
    pcm_sigma,
)
from afm.reference import tile_bounds

__all__ = [
    "DRIFT_TIMES",
    "NOISE_MODELS",
    "GaussianWeightNoise",
    "NoiseHandle",
    "NoiseModel",
    "PCMDeviceState",
    "PCMDriftNoise",
    "PCMProgrammingNoise",
    "apply_noise",
    "apply_noise_",
    "format_duration",
    "get_noise_model",
    "layer_seed",
    "noise_model_from_dict",
    "parse_duration",
    "pcm_sigma",
    "seeded_noise",
    "seeded_read_noise",
    "select_noise_layers",
    "tile_bounds",
]
