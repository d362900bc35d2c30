import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    set_by_path,
)
from afm.presets import PRESETS, get_preset


@pytest.mark.parametrize(
    "build, field, value",
    [
        (lambda: InputQuantConfig(bits=0), "bits", 0),
        (lambda: InputQuantConfig(bits=1), "bits", 1),
        (lambda: InputQuantConfig(bits=8.0), "bits", 8.0),
        (lambda: InputQuantConfig(init_std_alpha=-1.0), "init_std_alpha", -1.0),
        (lambda: InputQuantConfig(decay=-0.1), "decay", -0.1),
        (lambda: InputQuantConfig(min_fraction=1.5), "min_fraction", 1.5),
        (lambda: InputQuantConfig(init_steps=-3), "init_steps", -3),
        (lambda: OutputQuantConfig(bits=8, bound=None), "bound", None),
        (lambda: OutputQuantConfig(bits=None, bound=14.0), "bound", 14.0),
        (lambda: OutputQuantConfig(bits=8, bound=-1.0), "bound", -1.0),
        (lambda: WeightNoiseConfig("add_gauss", std=-0.1), "std", -0.1),
        (lambda: WeightNoiseConfig("gauss", std=0.1), "kind", "gauss"),
        (lambda: WeightNoiseConfig("none", std=0.1), "std", 0.1),
        (lambda: OutputNoiseConfig(std=-0.04), "std", -0.04),
        (lambda: OutputNoiseConfig(std=float("nan")), "std", float("nan")),
        (lambda: ClipConfig("per_row", 2.5), "kind", "per_row"),
        (lambda: ClipConfig("gaussian", 0.0), "sigma", 0.0),
        (lambda: WeightQuantConfig(bits=1), "bits", 1),
        (lambda: WeightQuantConfig(bits=4, group_size=0), "group_size", 0),
        (lambda: AnalogConfig(max_input_size=0), "max_input_size", 0),
        (lambda: AnalogConfig(backend="cuda"), "backend", "cuda"),
    ],
)
def test_invalid_values_name_field_and_value(build, field, value):
    with pytest.raises(ValueError) as err:
        build()
    assert f"{field}=" in str(err.value)
    assert repr(value) in str(err.value)


def test_output_quantization_needs_input_ranges():
    with pytest.raises(ValueError, match="output"):
        AnalogConfig(input=InputQuantConfig(bits=None, learn_ranges=False))


def test_enums_are_coerced_from_strings():
    cfg = AnalogConfig(
        weight_noise=WeightNoiseConfig("add_gauss", 0.1),
        clip=ClipConfig("gaussian"),
        backend="torch",
    )
    assert cfg.weight_noise.kind is WeightNoiseKind.ADD_GAUSS
    assert cfg.clip.kind is ClipKind.GAUSSIAN
    assert cfg.backend is Backend.TORCH


def test_configs_are_frozen():
    cfg = AnalogConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_input_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    text = json.dumps(cfg.to_dict())
    assert AnalogConfig.from_dict(json.loads(text)) == cfg
    assert json.loads(text)["version"] == 1


def test_preset_table_of_the_spec():
    afm = get_preset("afm-paper")
    assert (afm.input.bits, afm.input.learn_ranges, afm.input.init_steps) == (8, True, 500)
    assert (afm.input.init_std_alpha, afm.input.decay, afm.input.min_fraction) == (18.0, 0.01, 0.95)
    assert (afm.output.bits, afm.output.bound) == (8, 14.0)
    assert afm.weight_noise == WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, 0.03)
    assert afm.output_noise.std == 0
    assert afm.clip == ClipConfig(ClipKind.GAUSSIAN_PER_CHANNEL, 2.5)
    assert afm.max_input_size is None
    lora = get_preset("ahwa-lora")  # the AHWA-LoRA code's chip (tests/test_chips.py)
    assert (lora.input.bits, lora.output.bits, lora.output.bound) == (8, 8, 12.0)
    assert lora.input.dynamic and lora.output.bound_management.value == "iterative"
    assert lora.weight_noise == WeightNoiseConfig(WeightNoiseKind.ADD_GAUSS_PER_CHANNEL, 0.067)
    assert lora.output_noise.std == 0.04 and lora.output_noise.keep_at_eval
    assert lora.clip == ClipConfig(ClipKind.GAUSSIAN, 3.0)
    assert lora.max_input_size == 512
    ideal = get_preset("ideal")
    assert ideal.input.bits is None and not ideal.input.learn_ranges
    assert ideal.output.bits is None and not ideal.weight_noise.enabled
    assert ideal.clip.kind is ClipKind.NONE and ideal.max_input_size is None


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="afm-paper"):
        get_preset("afm-papr")


def test_from_dict_rejects_unknown_keys_and_newer_versions():
    d = get_preset("afm-paper").to_dict()
    with pytest.raises(ValueError, match="unknown keys.*'tiles'"):
        AnalogConfig.from_dict({**d, "tiles": 3})
    bad = json.loads(json.dumps(d))
    bad["input"]["bitz"] = 8
    with pytest.raises(ValueError, match="bitz"):
        AnalogConfig.from_dict(bad)
    with pytest.raises(ValueError, match="newer"):
        AnalogConfig.from_dict({**d, "version": 99})


def test_set_by_path():
    cfg = set_by_path(get_preset("afm-paper"), "output.bound", 10.0)
    assert cfg.output.bound == 10.0
    with pytest.raises(ValueError, match="no field 'output.bund'"):
        set_by_path(cfg, "output.bund", 1.0)
    with pytest.raises(ValueError, match="bits"):
        set_by_path(cfg, "input.bits", 1)


def test_num_tiles():
    assert AnalogConfig(max_input_size=128).num_tiles(257) == 3
    assert AnalogConfig(max_input_size=None).num_tiles(257) == 1
    assert AnalogConfig(max_input_size=512).num_tiles(512) == 1


# ----------------------------------------------------------------------------- fuzzing
bits = st.one_of(st.none(), st.integers(-3, 20))
reals = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))
kinds = st.sampled_from(["none", "add_gauss", "add_gauss_per_channel", "bogus", 3])


def _valid_bits(b):
    return b is None or 2 <= b <= 16


@settings(max_examples=300, deadline=None)
@given(
    b_in=bits,
    b_out=bits,
    bound=st.one_of(st.none(), reals),
    kind=kinds,
    std=reals,
    sigma=reals,
    m=st.one_of(st.none(), st.integers(-2, 4096)),
)
def test_fuzz_config_either_valid_or_named_valueerror(b_in, b_out, bound, kind, std, sigma, m):
    try:
        cfg = AnalogConfig(
            input=InputQuantConfig(bits=b_in),
            output=OutputQuantConfig(bits=b_out, bound=bound),
            weight_noise=WeightNoiseConfig(kind, std),
            clip=ClipConfig("gaussian", sigma),
            max_input_size=m,
        )
    except ValueError as err:
        assert "=" in str(err) and "invalid" in str(err)
        return
    # Accepted configs satisfy every rule and round-trip exactly.
    assert _valid_bits(cfg.input.bits) and _valid_bits(cfg.output.bits)
    assert (cfg.output.bits is None) == (cfg.output.bound is None)
    assert cfg.weight_noise.std >= 0 and cfg.clip.sigma > 0
    assert m is None or m >= 1
    assert AnalogConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_preset_names_a_valid_deployment_noise():
    from afm.analog.noise import get_noise_model
    from afm.presets import eval_noise_of

    for name in PRESETS:
        model = get_noise_model(**eval_noise_of(name))
        assert model.scale > 0
    assert get_noise_model(**eval_noise_of("tiny-stress")).scale == 3.0
    stress, paper = get_preset("tiny-stress"), get_preset("afm-paper")
    assert (stress.input, stress.output, stress.clip) == (paper.input, paper.output, paper.clip)


def test_w4a8_qat_preset_is_the_baseline_config():
    from afm.export.rtn import w4a8_qat_config

    cfg = get_preset("w4a8-qat")
    assert w4a8_qat_config() == cfg
    assert (cfg.weight_quant.bits, cfg.input.bits, cfg.output.bits) == (4, 8, None)
    assert not cfg.weight_noise.enabled and cfg.clip.kind is ClipKind.NONE
    assert w4a8_qat_config(group_size=32).weight_quant.group_size == 32
