"""Issue 15 §2: conversion and selection are never silent no-ops.

Converting an analog model is an error unless the chip is changed explicitly
(``afm.set_chip``), and every include / exclude / overrides / skip pattern must select a
layer (the error lists the closest names) — in convert, set_chip, deployment noise and
RTN-W4 (export and LoRA targets: tests/export, tests/lora).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import afm
from afm.analog import noise as N
from afm.config import set_by_path
from afm.export.rtn import rtn_w4

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------- convert twice


def test_convert_on_an_analog_model_is_an_error(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    with pytest.raises(ValueError, match="already has 14 analog layers.*afm.set_chip"):
        afm.convert(model, afm.get_preset("ahwa-lora"))
    assert all(
        m.analog_config == afm.get_preset("afm-paper") for m in afm.analog_layers(model).values()
    )


def test_convert_a_partly_analog_model_is_an_error_too(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"), include=["q_proj"])
    with pytest.raises(ValueError, match="already has 2 analog layers"):
        afm.convert(model, afm.get_preset("afm-paper"))


def test_set_chip_puts_the_new_config_in_force(tiny_model):
    new = set_by_path(afm.get_preset("afm-paper"), "output.bits", 6)
    direct = afm.convert(tiny_model("llama"), new)
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    before = model(IDS).logits
    assert afm.set_chip(model, new) is model
    assert all(m.analog_config == new for m in afm.analog_layers(model).values())
    after = model(IDS).logits
    assert torch.equal(after, direct(IDS).logits) and not torch.equal(after, before)


def test_set_chip_include_and_overrides(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    lora_chip = afm.get_preset("ahwa-lora")
    ideal = afm.get_preset("ideal")
    afm.set_chip(model, lora_chip, include=[r"mlp\."], overrides={"down_proj": ideal})
    layers = model.model.layers
    assert layers[0].mlp.up_proj.analog_config == lora_chip
    assert layers[1].mlp.down_proj.analog_config == ideal
    assert layers[0].self_attn.q_proj.analog_config == afm.get_preset("afm-paper")


def test_set_chip_refuses_a_tile_count_change_before_changing_anything(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    tiled = set_by_path(afm.get_preset("ahwa-lora"), "max_input_size", 16)
    with pytest.raises(ValueError, match="tiles.*nothing was changed"):
        afm.set_chip(model, tiled)
    assert all(
        m.analog_config == afm.get_preset("afm-paper") for m in afm.analog_layers(model).values()
    )


def test_set_chip_on_a_digital_model_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="no AnalogLinear layers; use afm.convert"):
        afm.set_chip(tiny_model("llama"), afm.get_preset("afm-paper"))


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include=["no_such_layer"]), r"include: 'no_such_layer' matches no linear layer"),
        (dict(include="q_prj"), r"'q_prj' \(closest: q_proj"),
        (dict(exclude=["down_prj"]), r"exclude: 'down_prj' \(closest: down_proj"),
        (
            dict(overrides={"no_such_layer": afm.get_preset("ideal")}),
            "overrides: 'no_such_layer' matches no selected layer",
        ),
        (
            dict(overrides={"mlp": afm.get_preset("ideal"), "up_proj": afm.get_preset("ideal")}),
            "overrides 'up_proj' only match layers that an earlier pattern already configures",
        ),
        (dict(include=["lm_head"]), "the output head stays digital unless convert_lm_head=True"),
        (
            dict(exclude=["lm_head"], overrides={"lm_head": afm.get_preset("ideal")}),
            "overrides: 'lm_head' matches no selected layer",
        ),
    ],
)
def test_convert_patterns_that_select_nothing(tiny_model, kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        afm.convert(model, afm.get_preset("afm-paper"), **kwargs)
    assert not afm.analog_layers(model)  # nothing was converted


def test_pattern_errors_are_one_line_and_a_value_error(tiny_model):
    with pytest.raises(afm.PatternMatchError) as err:
        afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"), include=["no_such_layer"])
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert "model.layers.0.self_attn.q_proj" in str(err.value)  # what names look like


def test_set_chip_patterns_that_select_nothing(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"), include=["mlp"])
    with pytest.raises(ValueError, match=r"set_chip: include: 'q_proj' .*matches no analog layer"):
        afm.set_chip(model, afm.get_preset("ideal"), include=["q_proj"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include=["no_such_layer"]), "deployment noise: include: 'no_such_layer'"),
        (dict(exclude="up_prj"), r"exclude: 'up_prj' \(closest: up_proj"),
        (dict(include=["lm_head"]), "'lm_head' matches no linear layer"),  # never perturbed
        (dict(only_analog=True), "no layer selected among 0 analog layers"),
        (dict(exclude=["proj"]), "no layer selected among 14 linear layers"),
    ],
)
def test_noise_patterns_that_select_nothing(tiny_model, kwargs, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        N.apply_noise_(model, N.PCMProgrammingNoise(), seed=0, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rtn_w4_skip_that_matches_nothing(tiny_model):
    model = tiny_model("llama")
    head = model.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"RTN-W4: skip: 'lm_haed' \(closest: lm_head"):
        rtn_w4(model, skip=("lm_haed",))
    assert torch.equal(model.lm_head.weight, head)
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        rtn_w4(model, skip=(".",))


def test_valid_patterns_still_work(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"), include=["q_proj"], exclude=[r"layers\.1\."])
    assert sorted(afm.analog_layers(model)) == ["model.layers.0.self_attn.q_proj"]
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    handle = N.apply_noise_(model, N.PCMProgrammingNoise(), seed=0, include=["q_proj"])
    assert handle.layer_names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
