"""Named, fully built hardware configurations (spec: hardware-model.md §6).

Presets are data: each entry is an ``AnalogConfig`` and a one-line source.
Make variants with ``dataclasses.replace`` or ``afm.config.set_by_path``.
"""

from __future__ import annotations

from dataclasses import dataclass

from afm.config import (
    AnalogConfig,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightNoiseKind,
)


@dataclass(frozen=True)
class Preset:
    config: AnalogConfig
    source: str


PRESETS: dict[str, Preset] = {
    "afm-paper": Preset(
        AnalogConfig(
            input=InputQuantConfig(
                bits=8,
                learn_ranges=True,
                init_steps=500,
                init_std_alpha=18.0,
                init_value=3.0,
                decay=0.01,
                min_fraction=0.95,
            ),
            output=OutputQuantConfig(bits=8, bound=14.0),
            weight_noise=WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, std=0.03),
            output_noise=OutputNoiseConfig(std=0.0),
            clip=ClipConfig(ClipKind.GAUSSIAN_PER_CHANNEL, sigma=2.5),
            max_input_size=None,
        ),
        "Büchel et al. 2025, Analog Foundation Models (training chip)",
    ),
    "ahwa-lora": Preset(
        AnalogConfig(
            input=InputQuantConfig(bits=8, learn_ranges=True),
            # The AHWA-LoRA paper states no bound; 10 is aihwkit's standard HWA preset.
            output=OutputQuantConfig(bits=8, bound=10.0),
            weight_noise=WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS, std=0.067),
            output_noise=OutputNoiseConfig(std=0.04, per_channel=False),
            clip=ClipConfig(ClipKind.GAUSSIAN, sigma=3.0),
            max_input_size=512,
        ),
        "Li et al. 2024/2025, AHWA-LoRA (training chip of the analog meta-weights)",
    ),
    "ideal": Preset(
        AnalogConfig(
            input=InputQuantConfig(bits=None, learn_ranges=False),
            output=OutputQuantConfig(bits=None, bound=None),
            weight_noise=WeightNoiseConfig(),
            output_noise=OutputNoiseConfig(),
            clip=ClipConfig(ClipKind.NONE),
            max_input_size=None,
        ),
        "No analog effects: AnalogLinear computes exactly what nn.Linear does",
    ),
}


def get_preset(name: str) -> AnalogConfig:
    """The ``AnalogConfig`` of a named preset; a clear error lists the names."""
    try:
        return PRESETS[name].config
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
