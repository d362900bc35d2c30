"""Every supported family, fully analog (issue 16): coverage, HF round trip, deployment noise.

Tiny random models of each family (tests/tiny_archs.py).  For each: every linear map afm
supports is analog (the head and MoE routers digital by policy, nothing unsupported),
``save_pretrained`` / ``from_pretrained`` gives identical logits and tensors, and each
deployment noise model changes every analog weight (experts included) and ``restore``
puts them back bitwise.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_archs import FAMILIES, MOE, build, tokens

import afm
from afm.analog.experts import AnalogExperts
from afm.analog.noise import apply_noise_, get_noise_model


def _analog(family: str) -> transformers.PreTrainedModel:
    model = build(family)
    afm.convert(model, afm.get_preset("afm-paper"))
    afm.calibrate_input_ranges_(model, [tokens()], max_steps=1, progress=False)
    return model.eval()


def _analog_weight_keys(model) -> list[str]:
    keys = []
    for name, module in afm.analog_layers(model).items():
        if isinstance(module, AnalogExperts):
            keys += [f"{name}.{p}" for p in module.projections]
        else:
            keys.append(f"{name}.weight")
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_is_every_supported_map(family):
    model = build(family)
    before = afm.coverage(model)
    assert before.analog == 0 and before.unsupported == 0
    afm.convert(model, afm.get_preset("afm-paper"))
    cov = afm.coverage(model)
    assert cov.supported_fraction == 1.0
    assert cov.digital_excluded == 0 and cov.unsupported == 0
    assert cov.total == before.total  # converting moves parameters, it adds none
    head = model.get_output_embeddings().weight.numel()
    assert cov.digital_head == head
    if family in MOE:
        assert any(isinstance(m, AnalogExperts) for m in model.modules())
        assert cov.digital_router > 0
        # the experts hold most of a MoE model's linear-map parameters
        experts = sum(
            getattr(m, p).numel()
            for m in model.modules()
            if isinstance(m, AnalogExperts)
            for p in m.projections
        )
        assert experts > cov.analog / 2
    else:
        assert cov.digital_router == 0
    assert cov.analog + cov.digital_head + cov.digital_router == cov.total


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, tmp_path):
    model = _analog(family)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sorted(afm.analog_layers(loaded)) == sorted(afm.analog_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    a, b = model.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("noise", ["pcm", "gaussian", "pcm-drift"])
def test_noise_touches_every_analog_weight(family, noise):
    model = _analog(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analog = _analog_weight_keys(model)
    handle = apply_noise_(model, get_noise_model(noise), seed=7)
    after = model.state_dict()
    untouched = [k for k in analog if torch.equal(before[k], after[k])]
    assert not untouched, untouched
    if family in MOE:  # every expert of every experts module, not only the first
        for name, m in afm.analog_layers(model).items():
            if isinstance(m, AnalogExperts):
                for p in m.projections:
                    for e in range(m.num_experts):
                        assert not torch.equal(before[f"{name}.{p}"][e], after[f"{name}.{p}"][e])
    handle.restore()
    restored = model.state_dict()
    assert all(torch.equal(before[k], restored[k]) for k in before)


@pytest.mark.parametrize("family", MOE)
def test_noise_is_seeded(family):
    model = _analog(family)
    runs = []
    for _ in range(2):
        with apply_noise_(model, get_noise_model("pcm"), seed=3):
            runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_routers_are_digital_by_policy_and_selectable_when_linear(caplog):
    model = build("mixtral")
    with caplog.at_level("INFO", logger="afm.analog.convert"):
        afm.convert(model, afm.get_preset("afm-paper"))
    line = next(r.getMessage() for r in caplog.records if "converted" in r.getMessage())
    assert "linear-map parameters analog" in line and "routers 256" in line
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    # a TopKRouter computes its logits in its own forward: analog routers are refused
    with pytest.raises(ValueError, match="convert_router=True.*MixtralTopKRouter"):
        afm.convert(build("mixtral"), afm.get_preset("afm-paper"), convert_router=True)
    # a router that is an nn.Linear (a custom MoE block) becomes analog when asked
    custom = build("mixtral")
    block = custom.model.layers[0].mlp
    block.gate = torch.nn.Linear(32, 4, bias=False)
    afm.convert(custom, afm.get_preset("afm-paper"), exclude="layers\\.1\\.mlp\\.gate")
    assert not isinstance(block.gate, afm.AnalogLinear)  # still digital by default
    afm.revert(custom)
    afm.convert(
        custom, afm.get_preset("afm-paper"), convert_router=True, exclude="layers\\.1\\.mlp\\.gate"
    )
    assert isinstance(block.gate, afm.AnalogLinear)


class _Custom(torch.nn.Module):
    """A parameterised linear map afm does not know (a custom experts class)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 32, 32) * 0.05)

    def forward(self, x):
        return x


def test_unsupported_linear_maps_are_an_error_unless_excluded():
    model = build("llama")
    model.model.layers[0].custom = _Custom()
    assert afm.coverage(model).unsupported_names == ("model.layers.0.custom",)
    with pytest.raises(afm.UnsupportedLayerError, match="'model.layers.0.custom'.*exclude="):
        afm.convert(model, afm.get_preset("afm-paper"))
    assert not afm.analog_layers(model)  # refused before any layer changed
    afm.convert(model, afm.get_preset("afm-paper"), exclude="custom")
    cov = afm.coverage(model)
    assert cov.unsupported == 4 * 32 * 32 and cov.supported_fraction == 1.0
    # include that does not select it is an explicit choice too
    fresh = build("llama")
    fresh.model.layers[0].custom = _Custom()
    afm.convert(fresh, afm.get_preset("afm-paper"), include="q_proj")
    assert afm.coverage(fresh).digital_excluded > 0
