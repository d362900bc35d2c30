import re

import pytest
import torch
from torch import nn

import afm
from afm.analog.layers import AnalogLinear

ARCHS = ["llama", "phi3", "qwen2", "mistral", "gpt2"]


def _linear_names(model):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_ideal_gives_same_logits_and_afm_paper_differs(tiny_model, arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 96, (2, 10))
    ref = model(ids).logits
    n_linear = len(_linear_names(model))
    afm.convert(model, afm.get_preset("ideal"))
    assert len(afm.analog_layers(model)) == n_linear - 1  # everything but lm_head
    assert torch.equal(model(ids).logits, ref)
    afm.revert(model)
    afm.convert(model, afm.get_preset("afm-paper"))
    out = model(ids).logits
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    gen = model.generate(ids[:1, :3], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_revert_is_bitwise(tiny_model, arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = {n: type(m) for n, m in model.named_modules()}
    afm.convert(model, afm.get_preset("afm-paper"))
    afm.revert(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == types_before


def test_gpt2_conv1d_transposed_weight(tiny_model):
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    y = conv(x)
    layer = AnalogLinear.from_linear(conv, afm.get_preset("ideal"))
    assert layer.weight.shape == (conv.nf, 32)
    assert torch.allclose(layer(x), y, atol=1e-6)


def test_include_exclude_overrides(tiny_model):
    model = tiny_model("llama")
    afm.convert(
        model,
        afm.get_preset("afm-paper"),
        include=[r"mlp\."],
        exclude=["down_proj"],
        overrides={r"layers\.1\.": afm.get_preset("ahwa-lora")},
    )
    names = sorted(afm.analog_layers(model))
    assert names == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert model.model.layers[1].mlp.up_proj.analog_config == afm.get_preset("ahwa-lora")
    assert model.model.layers[0].mlp.up_proj.analog_config == afm.get_preset("afm-paper")
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert not isinstance(model.model.layers[0].mlp.down_proj, AnalogLinear)
    # ahwa-lora tiles at 512: one tile for this width
    assert model.model.layers[1].mlp.up_proj.input_range.shape == (1,)


def test_exact_name_and_compiled_regex(tiny_model):
    model = tiny_model("llama")
    afm.convert(
        model,
        afm.get_preset("ideal"),
        include=["model.layers.0.self_attn.q_proj", re.compile(r"k_proj$")],
    )
    assert sorted(afm.analog_layers(model)) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]


def test_tied_lm_head_gets_its_own_weight(tiny_model):
    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    emb_before = emb.detach().clone()
    afm.convert(model, afm.get_preset("afm-paper"), convert_lm_head=True)
    assert isinstance(model.lm_head, AnalogLinear)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        model.lm_head.weight.mul_(0.0)
    afm.clip_weights_(model)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)


def test_conversion_shares_parameters_no_copy(tiny_model):
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    w_ptr = q.weight.data_ptr()
    afm.convert(model, afm.get_preset("afm-paper"))
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == w_ptr


def test_training_flag_is_copied(tiny_model):
    model = tiny_model("llama").train()
    afm.convert(model, afm.get_preset("afm-paper"))
    assert all(m.training for m in afm.analog_layers(model).values())
    model.eval()
    afm.revert(model)
    model2 = tiny_model("llama").eval()
    afm.convert(model2, afm.get_preset("afm-paper"))
    assert not any(m.training for m in afm.analog_layers(model2).values())
