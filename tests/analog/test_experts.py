"""AnalogExperts: fused MoE experts on the chip, checked against AnalogLinear per expert."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_archs import build, tokens
from torch import nn

import afm
from afm.analog.experts import AnalogExperts, expert_matrix
from afm.analog.layers import AnalogLinear
from afm.config import Backend, WeightNoiseConfig


def _experts(family: str = "mixtral"):
    """A tiny model and its first experts module, with weights of unit scale (so that
    uncalibrated ranges neither clip nor round everything to zero)."""
    model = build(family)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    return model, experts


def _routing(tokens_n: int, num_experts: int, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens_n)])
    w = torch.rand(tokens_n, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def _chip(**changes):
    cfg = afm.get_preset("afm-paper")
    return dataclasses.replace(cfg, **{"backend": Backend.TORCH, **changes})


def _oracle(analog: AnalogExperts, x, idx, w):
    """Each token through its experts, one AnalogLinear per expert matrix (eval, no noise)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = x[t : t + 1]
            for proj in analog.projections:
                w_e = expert_matrix(analog, proj, e)
                lin = nn.Linear(w_e.shape[1], w_e.shape[0], bias=analog.has_bias)
                lin.weight = nn.Parameter(w_e.detach().clone())
                if analog.has_bias:
                    lin.bias = nn.Parameter(getattr(analog, f"{proj}_bias")[e].detach().clone())
                layer = AnalogLinear.from_linear(lin, analog.analog_config).eval()
                layer.input_range.data.copy_(analog.input_range(proj)[e])
                h = layer(h)
                if proj != "down_proj":
                    h = analog._digital._apply_gate(h) if analog.has_gate else analog.act_fn(h)
            out[t] += w[t, j] * h[0]
    return out


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_each_expert_is_an_analog_linear(family):
    _, experts = _experts(family)
    analog = AnalogExperts.from_experts(experts, _chip()).eval()
    with torch.no_grad():
        for rng in analog.input_ranges().values():  # a different range per expert and tile
            rng.copy_(torch.rand(rng.shape) + 0.5)
    x = torch.randn(6, 32)
    idx, w = _routing(6, analog.num_experts)
    with torch.no_grad():
        got = analog(x, idx, w)
        want = _oracle(analog, x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ideal_chip_is_the_digital_experts():
    _, experts = _experts("qwen2_moe")
    x = torch.randn(10, 32)
    idx, w = _routing(10, experts.num_experts)
    with torch.no_grad():
        want = experts(x, idx, w)
        got = AnalogExperts.from_experts(experts, afm.get_preset("ideal"))(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_parameters_are_reused_and_revert_is_bitwise():
    model, experts = _experts()
    fused = {n: p for n, p in experts.named_parameters()}
    afm.convert(model, afm.get_preset("afm-paper"))
    analog = model.model.layers[0].mlp.experts
    assert isinstance(analog, AnalogExperts)
    for name, p in fused.items():
        assert getattr(analog, name) is p  # the same Parameter: no copy, no memory growth
    extra = sum(r.numel() for r in analog.input_ranges().values())
    assert extra == 2 * analog.num_experts  # one range per expert and tile, nothing else
    afm.revert(model)
    back = model.model.layers[0].mlp.experts
    assert type(back).__name__ == "MixtralExperts"
    assert all(getattr(back, n) is p for n, p in fused.items())


def test_ranges_learn_only_from_routed_tokens():
    _, experts = _experts()
    analog = AnalogExperts.from_experts(experts, _chip()).train()
    x = torch.randn(8, 32, requires_grad=True)
    idx = torch.tensor([[0, 1]] * 8)  # experts 2 and 3 get no token
    w = torch.full((8, 2), 0.5)
    analog(x, idx, w).pow(2).sum().backward()
    for proj in analog.projections:
        g = analog.input_range(proj).grad
        assert g is not None and torch.all(g[2:] == 0) and torch.any(g[:2] != 0)
        wg = getattr(analog, proj).grad
        assert torch.all(wg[2:] == 0) and torch.any(wg[:2] != 0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_calibration_is_per_expert():
    model = build("mixtral")
    afm.convert(model, afm.get_preset("afm-paper"))
    x = tokens(2, 12)
    afm.calibrate_input_ranges_(model, [x], max_steps=1, progress=False)
    analog = model.model.layers[0].mlp.experts
    assert analog.range_observer is None  # calibration removes its observer
    first, init = analog.projections[0], analog.analog_config.input.init_value
    # What each expert of layer 0 received: replay the calibrated model with the experts'
    # ranges reset (layer 0's experts see the outputs of the calibrated attention).
    twin = copy.deepcopy(model)
    twin_experts = twin.model.layers[0].mlp.experts
    with torch.no_grad():
        twin_experts.input_range(first).fill_(init)
    seen: dict[int, torch.Tensor] = {}

    def spy(module, proj, e, block):
        if proj == first:
            seen[e] = block.detach().clone()

    twin_experts.range_observer = spy
    with torch.no_grad():
        twin(x)
    alpha = analog.analog_config.input.init_std_alpha
    assert seen
    for e in range(analog.num_experts):
        got = float(analog.input_range(first).detach()[e, 0])
        if e in seen:  # k = 0: r = |alpha * std(x routed to e)|
            assert got == pytest.approx(abs(alpha * float(seen[e].float().std())), rel=1e-5)
        else:  # an expert that got no token keeps its initial range
            assert got == init


def test_clipping_is_per_expert_matrix():
    _, experts = _experts()
    cfg = _chip()
    analog = AnalogExperts.from_experts(experts, cfg)
    with torch.no_grad():
        analog.gate_up_proj[1].mul_(10)  # expert 1 much larger: its bound must be its own
    before = analog.gate_up_proj.detach().clone()
    analog.clip_weights_()
    for e in range(analog.num_experts):
        w = before[e].float()
        bound = cfg.clip.sigma * w.std(dim=1, keepdim=True)
        torch.testing.assert_close(analog.gate_up_proj[e], w.clamp(-bound, bound))


def test_numba_backend_matches_torch():
    pytest.importorskip("numba")
    _, experts = _experts()
    x = torch.randn(12, 32)
    idx, w = _routing(12, experts.num_experts)
    outs = []
    # weight noise off: the numba backend draws it with its own counter-based generator
    # (docs/cpu-kernels.md), equal to torch.randn in distribution only
    for backend in (Backend.TORCH, Backend.NUMBA):
        chip = _chip(backend=backend, weight_noise=WeightNoiseConfig())
        analog = AnalogExperts.from_experts(copy.deepcopy(experts), chip)
        analog.train()
        analog.noise_generator = torch.Generator().manual_seed(0)
        outs.append(analog(x, idx, w))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_training_noise_is_per_expert_and_seeded():
    _, experts = _experts()
    analog = AnalogExperts.from_experts(experts, _chip()).train()
    x = torch.randn(4, 32)
    idx, w = _routing(4, analog.num_experts)
    runs = []
    for seed in (0, 0, 1):
        analog.noise_generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            runs.append(analog(x, idx, w))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_set_chip_changes_experts_and_refuses_tile_changes():
    model = build("olmoe")
    afm.convert(model, afm.get_preset("afm-paper"))
    afm.set_chip(model, afm.get_preset("tiny-stress"))
    analog = model.model.layers[0].mlp.experts
    assert analog.analog_config == afm.get_preset("tiny-stress")
    with pytest.raises(ValueError, match="gate_up_proj of 'model.layers.0.mlp.experts'"):
        afm.set_chip(
            model,
            dataclasses.replace(afm.get_preset("afm-paper"), max_input_size=16),
            include="experts",
        )


def test_damaged_expert_ranges_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build("qwen3_moe")
    afm.convert(model, afm.get_preset("afm-paper"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.experts.down_proj_input_range"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    import transformers

    with pytest.raises(ValueError, match="down_proj_input_range.*non-positive"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_lora_on_a_moe_base_adapts_linears_and_refuses_experts():
    pytest.importorskip("peft")
    from afm.lora.model import attach_lora

    model = build("qwen2_moe")
    afm.convert(model, afm.get_preset("ahwa-lora"))
    with pytest.raises(ValueError, match="analog MoE experts 'model.layers.0.mlp.experts'"):
        attach_lora(copy.deepcopy(model), targets=["q_proj", "experts"])
    with pytest.raises(ValueError, match="target_parameters.*onto the chip"):
        attach_lora(copy.deepcopy(model), target_parameters=["experts.gate_up_proj"])
    peft_model = attach_lora(model, seed=0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # experts frozen
    assert any("shared_expert.down_proj.lora_A" in n for n in trainable)
    with torch.no_grad():
        assert torch.isfinite(peft_model(tokens()).logits).all()


def test_triton_backend_matches_torch_in_the_interpreter():
    """Each expert block through the Triton launcher (interpreted on CPU) = the torch path."""
    pytest.importorskip("triton")
    import triton.language.random as tl_random
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl_random.randn, InterpretedFunction):
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    _, experts = _experts()
    base = afm.get_preset("afm-paper")
    quiet = dataclasses.replace(base.output_noise, keep_at_eval=False)  # no RNG at eval
    x = torch.randn(6, 32)
    idx, w = _routing(6, experts.num_experts)
    outs = []
    for backend in (Backend.TORCH, Backend.TRITON):
        chip = dataclasses.replace(base, backend=backend, output_noise=quiet)
        analog = AnalogExperts.from_experts(copy.deepcopy(experts), chip).eval()
        assert analog.backend_for(x.device) is backend
        with torch.no_grad():
            outs.append(analog(x, idx, w))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
