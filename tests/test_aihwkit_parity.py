"""Parity with aihwkit-lightning's torch path for the afm-paper configuration.

aihwkit-lightning is installed with --no-deps in CI; without it these tests skip
(and say so).
"""

import pytest
import torch

import afm
from afm.analog.layers import AnalogLinear

aihwkit = pytest.importorskip("aihwkit_lightning", reason="aihwkit-lightning is not installed")


def _lightning_layer(k, n, max_input_size=None, init_from_data=0):
    from aihwkit_lightning.nn import AnalogLinear as LightningLinear
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightClipType,
        WeightNoiseInjectionType,
    )

    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 254
    cfg.forward.out_res = 254
    cfg.forward.out_bound = 14.0
    cfg.forward.out_noise = 0.0
    cfg.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    cfg.clip.sigma = 2.5
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    cfg.modifier.std_dev = 0.03
    cfg.mapping.max_input_size = max_input_size or -1
    ir = cfg.pre_post.input_range
    ir.enable = True
    ir.learn_input_range = True
    ir.init_from_data = init_from_data
    ir.init_std_alpha = 18.0
    ir.decay = 0.01
    ir.input_min_percentage = 0.95
    return LightningLinear(k, n, bias=True, rpu_config=cfg)


def _pair(k=96, n=40, m=None, seed=0):
    torch.manual_seed(seed)
    light = _lightning_layer(k, n, m)
    config = afm.get_preset("afm-paper").replace(max_input_size=m)
    ours = AnalogLinear.from_linear(torch.nn.Linear(k, n), config)
    with torch.no_grad():
        ours.weight.copy_(light.weight)
        ours.bias.copy_(light.bias)
        ranges = torch.linspace(0.8, 2.5, ours.input_range.numel())
        ours.input_range.copy_(ranges)
        light.input_range.data.copy_(ranges.view_as(light.input_range))
    return light, ours


@pytest.mark.parametrize("m", [None, 32])
def test_identical_outputs_noise_off(m):
    light, ours = _pair(m=m)
    light.eval()
    ours.eval()
    x = torch.randn(64, 96) * 1.2
    a, b = light(x), ours(x)
    step = (2 * 14 * 2.5 * ours.weight.abs().max() / 254).item()
    diff = (a - b).abs()
    assert diff.max().item() <= step * 1.01
    assert (diff > 1e-5).float().mean().item() < 0.005  # rounding ties only
    assert torch.allclose(a, b, atol=1e-5) or (diff > 1e-5).sum() < 5


@pytest.mark.parametrize("m", [None, 32])
def test_identical_gradients_noise_off(m):
    light, ours = _pair(m=m)
    # noise off on both: eval mode has no weight noise; compare all gradients
    light.eval()
    ours.eval()
    x = torch.randn(50, 96) * 1.5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(50, 40)
    light(xa).backward(g)
    ours(xb).backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, light.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ours.input_range.grad, light.input_range.grad.view(-1), atol=1e-4, rtol=1e-4
    )


def test_matching_noise_statistics():
    light, ours = _pair(k=128, n=64)
    for layer in (light, ours):
        layer.train()
        with torch.no_grad():
            layer.input_range.fill_(50.0)  # no clipping, fine input grid
    x = torch.eye(128) * 0.5
    with torch.no_grad():
        light.eval()
        clean = light(x)
        light.train()
        stds = []
        for layer in (light, ours):
            diffs = torch.stack([layer(x) - clean for _ in range(8)])
            stds.append(diffs.std().item())
    assert stds[0] == pytest.approx(stds[1], rel=0.05)
