"""Placements with main's checkpoint and head rules: a placement converted by afm.convert
saves with a plain save_pretrained and reloads identical; converting an analog model
with a placement is refused like any convert; the placement decides the head."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import afm
from afm.analog.hf import AfmQuantizationConfig, read_quantization_config
from afm.evaluate.loading import check_model_spec
from afm.evaluate.specs import EvalInputError, ModelSpec
from afm.training.report import analog_teacher
from afm.training.run_config import ConfigError, build_run_config

Q0 = "model.layers.0.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


def _placement(path, modules, chip="afm-paper", **kw):
    qc = AfmQuantizationConfig(afm.get_preset(chip), modules=modules, **kw)
    path.write_text(json.dumps(qc.to_dict()))
    return path


def test_a_placement_saves_with_save_pretrained_and_reloads_identical(toy_llama, tmp_path):
    model, tok = toy_llama(max_positions=128, tie=True)
    modules = ["lm_head", Q0, DOWN1]
    ideal = afm.get_preset("ideal")
    placement = read_quantization_config(
        _placement(tmp_path / "p.json", modules, overrides={DOWN1: ideal.to_dict()})
    )
    afm.convert(model.eval(), placement)
    with torch.no_grad():  # learned ranges that differ from the init value
        for i, layer in enumerate(afm.analog_layers(model).values()):
            layer.input_range.fill_(1.5 + i)
    model.save_pretrained(tmp_path / "ckpt")  # plain save: convert attached the chip
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ours, theirs = afm.analog_layers(model), afm.analog_layers(back)
    assert sorted(theirs) == sorted(ours) == sorted(modules)
    for name, layer in ours.items():
        assert theirs[name].analog_config == layer.analog_config
        assert torch.equal(theirs[name].input_range, layer.input_range)
    assert theirs[DOWN1].analog_config == ideal
    assert theirs[Q0].analog_config == afm.get_preset("afm-paper")
    # the saved config.json is the placement again (the head listed, untied)
    saved = read_quantization_config(tmp_path / "ckpt" / "config.json")
    assert sorted(saved.modules) == sorted(modules) and saved.overrides == {DOWN1: ideal}
    assert back.lm_head.weight is not back.get_input_embeddings().weight
    ids = tok(["Anna walked to the market"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_convert_with_a_placement_refuses_an_analog_model(toy_llama, tmp_path):
    model, _ = toy_llama(max_positions=128)
    afm.convert(model, afm.get_preset("afm-paper"))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(afm.AlreadyAnalogError, match="afm.set_chip"):
        afm.convert(model, AfmQuantizationConfig("ideal", modules=[Q0]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(
        m.analog_config == afm.get_preset("afm-paper") for m in afm.analog_layers(model).values()
    )
    # an afm checkpoint loads analog: a placement on top of it is refused too
    model.save_pretrained(tmp_path / "ckpt")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(afm.AlreadyAnalogError):
        afm.convert(back, AfmQuantizationConfig("afm-paper", modules=[Q0]))


def test_the_placement_decides_the_head_in_afm_eval_and_afm_train(toy_llama, tmp_path):
    model, tok = toy_llama(max_positions=128)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    path = _placement(tmp_path / "p.json", [Q0], chip="tiny-stress")
    with pytest.raises(EvalInputError, match="head= does not apply to placement="):
        check_model_spec(ModelSpec(str(d), placement=str(path), head="analog"))
    check_model_spec(ModelSpec(str(d), placement=str(path)))
    with pytest.raises(ConfigError, match="analog_head=True does not apply with placement"):
        build_run_config(
            str(d), "o", preset="tiny-stress", sets=[f"placement={path}", "analog_head=true"]
        )
    # the report's analog teacher: the head follows the placement's listing
    batch = dict(tok(["Q: 1+2=? A: 1+2=3. Answer: 3"], return_tensors="pt"))
    t = analog_teacher(model, "tiny-stress", [batch], True, ["lm_head", Q0])
    assert sorted(afm.analog_layers(t)) == sorted(["lm_head", Q0])
    with pytest.raises(ValueError, match="the placement lists the output head"):
        analog_teacher(model, "tiny-stress", [batch], False, ["lm_head", Q0])
    with pytest.raises(ValueError, match="leaves the head digital"):
        analog_teacher(model, "tiny-stress", [batch], True, [Q0])
