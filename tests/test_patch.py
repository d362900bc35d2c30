import re

import pytest
import torch
from torch import nn

import afm
from afm.layers import AnalogLinear

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


def test_eval_is_deterministic_train_is_noisy(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(1)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_hook_and_callback(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    layer = model.model.layers[0].mlp.up_proj
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = afm.register_clip_hook(opt, model)
    with torch.no_grad():
        layer.weight[0, 0] = 100.0
    std_before = layer.weight.detach().std(dim=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert layer.weight[0, 0].item() == pytest.approx(2.5 * std_before[0].item(), rel=1e-5)
    assert torch.all(layer.weight.detach().abs().amax(dim=1) <= 2.5 * std_before * (1 + 1e-5))
    handle.remove()
    cb = afm.clip_callback()
    with torch.no_grad():
        layer.weight[1, 1] = 100.0
    cb.on_optimizer_step(None, None, None, model=model)
    assert layer.weight[1, 1].item() < 100.0


def test_calibration_sets_ranges_from_data(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    batches = [{"input_ids": torch.randint(0, 96, (2, 12))} for _ in range(3)]
    captured = {}
    layer = model.model.layers[0].mlp.down_proj
    hook = layer.register_forward_pre_hook(
        lambda m, args: captured.setdefault("x", []).append(args[0].detach().clone())
    )
    used = afm.calibrate_input_ranges_(model, batches, progress=False)
    hook.remove()
    assert used == 3
    # r = mean over batches of 18·std(x) (the running mean of spec §2.4)
    expect = sum(18.0 * x.float().std() for x in captured["x"]) / 3
    assert layer.input_range.item() == pytest.approx(expect.item(), rel=1e-4)
    assert not model.training
    assert all(r.input_range.item() != 3.0 for r in afm.analog_layers(model).values())


def test_eval_abs_max_cache_follows_weight_updates():
    torch.manual_seed(0)
    layer = AnalogLinear.from_linear(nn.Linear(16, 8), afm.get_preset("afm-paper")).eval()
    x = torch.randn(4, 16)
    first = layer(x)
    assert torch.equal(layer(x), first)  # cached statistics give identical results
    with torch.no_grad():
        layer.weight.mul_(0.5)
    fresh = AnalogLinear.from_linear(nn.Linear(16, 8), afm.get_preset("afm-paper")).eval()
    with torch.no_grad():
        fresh.weight.copy_(layer.weight)
        fresh.bias.copy_(layer.bias)
    assert torch.equal(layer(x), fresh(x))
    layer.weight.data.mul_(2.0)  # bypasses the version counter ...
    layer.invalidate_cache()  # ... so the documented escape hatch is needed
    with torch.no_grad():
        fresh.weight.mul_(2.0)
    assert torch.equal(layer(x), fresh(x))


def test_deployment_noise_refreshes_eval_statistics(tiny_model):
    from afm.noise import GaussianWeightNoise, apply_noise_

    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 32)
    clean = layer(x)
    handle = apply_noise_(model, GaussianWeightNoise(std=0.3), seed=0)
    fresh = AnalogLinear.from_linear(nn.Linear(32, 64, bias=False), afm.get_preset("afm-paper"))
    fresh.eval()
    with torch.no_grad():
        fresh.weight.copy_(layer.weight)
    assert torch.equal(layer(x), fresh(x))  # the cached abs-max followed the noisy weight
    handle.restore()
    assert torch.equal(layer(x), clean)
