"""AnalogLinear as a layer: train/eval noise, cached eval statistics."""

import torch
from torch import nn

import afm
from afm.analog.layers import AnalogLinear


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
    from afm.analog.noise import GaussianWeightNoise, apply_noise_

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
