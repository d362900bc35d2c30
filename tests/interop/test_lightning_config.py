"""TorchInferenceRPUConfig → AnalogConfig: every field mapped, or refused by name."""

import io

import pytest
import torch

import afm
from afm.analog.layers import AnalogLinear
from afm.interop import UnsupportedRpuConfig, map_rpu_config, read_rpu_fields
from afm.interop.unpickle import RestrictedUnpickler

dill = pytest.importorskip("dill", reason="dill is not installed")
pytest.importorskip("aihwkit_lightning", reason="aihwkit-lightning is not installed")
from aihwkit_lightning.simulator.configs import (  # noqa: E402
    WeightClipType,
    WeightModifierType,
    WeightNoiseInjectionType,
    WeightQuantizationType,
)


def _fields(cfg):
    """Through dill and afm's unpickler, as the importer reads the file."""
    return read_rpu_fields(RestrictedUnpickler(io.BytesIO(dill.dumps(cfg))).load())


def _mapping(cfg):
    return map_rpu_config(_fields(cfg)[0])


def test_ibm_training_chip_is_afms_afm_paper_preset(rpu_config):
    """IBM's config.yaml chip (init_from_data 500) maps to afm's afm-paper preset exactly."""
    cfg = rpu_config(**{"pre_post.input_range.init_from_data": 500})
    cfg.modifier.offset = 0.0  # as IBM's create_rpu_config sets them
    cfg.pre_post.input_range.init_with_max = False
    fields, missing = _fields(cfg)
    assert missing == []
    assert map_rpu_config(fields).config == afm.get_preset("afm-paper")


REFUSED = [
    ({"pre_post.input_range.fast_mode": True}, "pre_post.input_range.fast_mode=True"),
    ({"clip.type": WeightClipType.LEARNABLE_PER_CHANNEL}, "clip.type='LearnablePerChannel'"),
    ({"forward.out_res": -1}, "forward.out_bound=14 without forward.out_res"),
    ({"modifier.quantization_type": WeightQuantizationType.DISCRETIZE}, "Discretize'"),
    ({"modifier.enable_during_test": True}, "modifier.enable_during_test=True is deprecated"),
    ({"modifier.offset": 0.1}, "modifier.offset=0.1"),
    ({"pre_post.input_range.init_with_max": True}, "init_with_max=True"),
    ({"pre_post.input_range.learn_input_range": False}, "learn_input_range=False"),
    ({"forward.inp_res": 100}, r"forward.inp_res=100 is not 2\^b - 2 steps"),
    ({"forward.out_res": 1 / 100}, r"forward.out_res=0.01 is not 2\^b - 2 steps"),
    ({"pre_post.input_range.enable": False}, "forward.inp_res=254 needs input ranges"),
    ({"forward.ir_drop": 1.0}, "forward.ir_drop=1.0 is not a IOParameters field afm knows"),
    ({"clip.sigma": -1.0}, "clip.sigma=-1.0 must be > 0"),
    ({"forward.inp_res": -1, "pre_post.input_range.dynamic": True}, "dynamic=True needs input"),
    ({"forward.out_noise": -0.1}, "forward.out_noise=-0.1 must be >= 0"),
    ({"mapping.max_input_size": 1.5}, "mapping.max_input_size=1.5 must be an integer"),
    ({"forward.out_bound": True}, "forward.out_bound=True must be a finite number"),
]


@pytest.mark.parametrize(("changes", "match"), REFUSED)
def test_unmodelled_fields_are_refused_by_name(rpu_config, changes, match):
    with pytest.raises(UnsupportedRpuConfig, match=match):
        _mapping(rpu_config(**changes))


def test_inert_fields_are_accepted(rpu_config):
    """A field another field switches off does not change the layer: no error."""
    cfg = rpu_config(
        **{"clip.type": WeightClipType.NONE, "clip.sigma": -1.0},  # sigma unused
        **{"modifier.res": 0.123, "pre_post.input_range.act_range_momentum": 0.5},
        **{"modifier.std_dev": 0.0},  # a noise type with std 0: no noise
    )
    config = _mapping(cfg).config
    assert config.clip.kind is afm.ClipKind.NONE and not config.weight_noise.enabled
    assert config.weight_quant.bits is None


def test_version_1_pickle_without_the_new_fields(rpu_config):
    cfg = rpu_config(**{"modifier.type": WeightModifierType.DISCRETIZE_ADD_NORMAL_PER_CHANNEL})
    cfg.modifier.res = 1 / 14
    del cfg.modifier.noise_type, cfg.modifier.quantization_type  # version 1 had neither
    fields, missing = _fields(cfg)
    assert missing == ["modifier.noise_type", "modifier.quantization_type"]
    config = map_rpu_config(fields).config
    assert config.weight_noise.kind is afm.WeightNoiseKind.ADD_GAUSS_PER_CHANNEL
    assert config.weight_quant.bits == 4 and config.weight_quant.group_size is None


def test_per_layer_output_noise_and_weight_quant_groups(rpu_config):
    cfg = rpu_config(max_input_size=16, **{"forward.out_noise": 0.04})
    cfg.modifier.quantization_type = WeightQuantizationType.DISCRETIZE_PER_CHANNEL
    cfg.modifier.res = 254
    mapping = _mapping(cfg)
    assert mapping.for_layer(16) == mapping.config  # one tile: as configured
    four = mapping.for_layer(64)
    assert four.output_noise.std == pytest.approx(0.04 / 2) and four.weight_quant.group_size == 16
    with pytest.raises(UnsupportedRpuConfig, match=r"tiles of sizes \[11, 12\]"):
        mapping.for_layer(34)


def _layer_pair(cfg, k=64, n=24, seed=0):
    from aihwkit_lightning.nn import AnalogLinear as LightningLinear

    torch.manual_seed(seed)
    theirs = LightningLinear(k, n, bias=True, rpu_config=cfg).eval()
    ours = AnalogLinear.from_linear(torch.nn.Linear(k, n), _mapping(cfg).for_layer(k)).eval()
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
        if theirs.input_range is not None:
            ranges = torch.linspace(0.8, 2.5, ours.input_range.numel())
            ours.input_range.copy_(ranges)
            theirs.input_range.data.copy_(ranges.view_as(theirs.input_range))
    return ours, theirs


WQ = {"modifier.quantization_type": WeightQuantizationType.DISCRETIZE_PER_CHANNEL}
DIGITAL = {"forward.inp_res": -1, "forward.out_res": -1, "forward.out_bound": 0.0}
LAYER_CASES = {
    "wq-1-tile": WQ,
    "wq-2-tiles": {**WQ, "mapping.max_input_size": 32},
    "dynamic": {"pre_post.input_range.dynamic": True, "clip.type": WeightClipType.NONE},
    "no-adc": {"forward.out_res": -1, "forward.out_bound": 0.0, "mapping.max_input_size": 24},
    "digital": {**DIGITAL, "pre_post.input_range.enable": False},
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_mapped_layer_matches_lightning_layer(rpu_config, case):
    cfg = rpu_config(**{"modifier.res": 1 / 14, **LAYER_CASES[case]})
    ours, theirs = _layer_pair(cfg)
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 1.2
    with torch.no_grad():
        a, b = ours(x), theirs(x)
        plain = torch.nn.functional.linear(x, ours.weight, ours.bias)
    # Equal up to ADC rounding ties (one output step); 4-bit weights put the products on
    # a coarse grid, so ties are more frequent than in tests/test_aihwkit_parity.py.
    diff = (a - b).abs()
    step = (2 * 14 * 2.5 * ours.weight.abs().max() / 254).item()
    assert torch.allclose(a, b, atol=1e-5) or (
        (diff > 1e-5).float().mean() < 0.01 and diff.max().item() <= step * 1.01
    ), diff.max()
    assert torch.allclose(a, plain, atol=1e-6) is (case == "digital")  # the chip is simulated


def test_enum_values_and_classes_are_checked(rpu_config):
    cfg = rpu_config()
    cfg.clip.type = WeightNoiseInjectionType.ADD_NORMAL  # wrong enum in the field
    with pytest.raises(UnsupportedRpuConfig, match="clip.type=WeightNoiseInjectionType"):
        _mapping(cfg)
    cfg = rpu_config()
    cfg.mapping = cfg.clip  # wrong class in a section
    with pytest.raises(UnsupportedRpuConfig, match="mapping=WeightClipParameter.*not an aihwkit"):
        _mapping(cfg)
