"""Named, fully built hardware configurations (spec: hardware-model.md §6).

Presets are data: each entry is an ``AnalogConfig`` and a one-line source.
Make variants with ``dataclasses.replace`` or ``afm.config.set_by_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from afm.config import (
    AnalogConfig,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightNoiseKind,
    WeightQuantConfig,
)


@dataclass(frozen=True)
class Preset:
    config: AnalogConfig
    source: str
    eval_noise: tuple[tuple[str, object], ...] = (
        ("name", "pcm"),
        ("scale", 1.0),
        ("tile_size", 512),
    )
    """The deployment noise this chip is evaluated under (``afm.analog.noise.get_noise_model``)."""
    eval_drift_times: tuple[str, ...] = ()
    """Drift times of the evaluation protocol (for a noise model with ``t_inference``)."""
    eval_seeds: int = 10
    """Programmed chips (noise seeds) per evaluation condition in the source's protocol."""
    analog_head: bool = False
    """The output head's policy (spec §7): True, the head is an analog layer like the others
    (converted, trained under the chip's noise, programmed with deployment noise); False,
    it stays a digital, noise-free ``nn.Linear``.  ``afm.convert(convert_lm_head=...)``,
    ``afm-train`` (``analog_head``) and ``afm-eval`` (``head=``) take it from here."""


_AFM_PAPER = AnalogConfig(
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
)


PRESETS: dict[str, Preset] = {
    # The AFM repository converts every nn.Linear, the head included (example.py), and its
    # noise script perturbs every linear layer (apply_noise_model.py).
    "afm-paper": Preset(
        _AFM_PAPER,
        "Büchel et al. 2025, Analog Foundation Models (training chip)",
        analog_head=True,
    ),
    # The chip of the AHWA-LoRA code (lora_training/run_qa.py, gen_rpu_config): aihwkit's
    # TorchInferenceRPUConfig with forward = IOParameters() (noise management ABS_MAX,
    # out_bound 12, BoundManagementType.ITERATIVE), 8-bit DAC / ADC (inp_res = out_res =
    # 1/254), out_noise 0.04 (applied in eval too), modifier ADD_NORMAL 0.067 on weights
    # mapped column-wise to max 1 (weight_scaling_omega 1, columnwise: = per channel),
    # LAYER_GAUSSIAN clipping 3σ, 512-input tiles; every linear layer analog, the task
    # head included; evaluated with PCMLikeNoiseModel(g_max=25) + GlobalDriftCompensation
    # at 0 s ... 10 years, 10 repetitions.
    "ahwa-lora": Preset(
        AnalogConfig(
            input=InputQuantConfig(bits=8, learn_ranges=False, dynamic=True),
            output=OutputQuantConfig(
                bits=8, bound=12.0, per_channel=True, bound_management="iterative"
            ),
            weight_noise=WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, std=0.067),
            output_noise=OutputNoiseConfig(std=0.04, per_channel=True, keep_at_eval=True),
            clip=ClipConfig(ClipKind.GAUSSIAN, sigma=3.0),
            max_input_size=512,
        ),
        "Li et al. 2024/2025, AHWA-LoRA: the chip of its code (lora_training/run_qa.py)",
        eval_noise=(
            ("name", "pcm-drift"),
            ("mode", "aihwkit"),
            ("g_max", 25.0),
            ("tile_size", 512),
            ("per_channel", True),
            ("readout_bits", 8),
            ("readout_bound", 12.0),
            ("readout_noise", 0.04),
        ),
        eval_drift_times=("0s", "1h", "1d", "1w", "1mo", "1y", "10y"),
        eval_seeds=10,
        analog_head=True,
    ),
    # The paper's chip barely touches a 3.5 M-parameter toy model (it keeps ~93 % under
    # PCM noise x1 where billion-parameter LLMs lose 8-10 points): its many redundant,
    # over-trained weights average the noise away.  The tiny demos therefore use the
    # same I/O (8-bit static inputs, 8-bit ADC, bound 14) with 3x the PCM programming
    # noise at evaluation, where the FP teacher loses ~20 points on toyworld_arith
    # (afm/assets/tiny/README.md), and train with a matching, larger weight noise.
    "tiny-stress": Preset(
        replace(
            _AFM_PAPER,
            weight_noise=WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, std=0.08),
        ),
        "afm's harsher chip for the tiny demos: afm-paper I/O, PCM programming noise x3",
        eval_noise=(("name", "pcm"), ("scale", 3.0), ("tile_size", 512)),
        analog_head=True,  # the AFM protocol, as afm-paper
    ),
    # Digital baseline of the AFM paper: 4-bit RTN weights per channel with a
    # straight-through gradient and 8-bit static learned input ranges, no analog effects.
    # `afm-train --preset w4a8-qat` trains it with the same distillation recipe.
    "w4a8-qat": Preset(
        AnalogConfig(
            input=InputQuantConfig(bits=8, learn_ranges=True),
            output=OutputQuantConfig(bits=None, bound=None),
            weight_noise=WeightNoiseConfig(),
            output_noise=OutputNoiseConfig(std=0.0),
            clip=ClipConfig(ClipKind.NONE),
            weight_quant=WeightQuantConfig(bits=4, group_size=None),
            max_input_size=None,
        ),
        "W4A8 QAT baseline (Büchel et al. 2025 compare AFM + RTN-W4 against it)",
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


def eval_noise_of(name: str) -> dict[str, object]:
    """``afm.analog.noise.get_noise_model`` keyword arguments of the preset's deployment noise."""
    return dict(preset_of(name).eval_noise)


def preset_of(name: str) -> Preset:
    """The whole :class:`Preset` (chip, source, evaluation protocol, head policy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def analog_head_of(name: str) -> bool:
    """The preset's output-head policy (``Preset.analog_head``)."""
    return preset_of(name).analog_head


def get_preset(name: str) -> AnalogConfig:
    """The ``AnalogConfig`` of a named preset; a clear error lists the names."""
    try:
        return PRESETS[name].config
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
