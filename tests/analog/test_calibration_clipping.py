"""Input-range calibration from data (spec §2.4) and weight clipping after steps (§3)."""

import pytest
import torch

import afm


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
