"""The evaluation loop's unprogrammed condition on a chip with eval-time output noise."""

from __future__ import annotations

import torch

import afm
from afm.evaluate.loop import programmed, scores_under_noise

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


def _ahwa(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("ahwa-lora")).eval()
    return model


def test_no_noise_condition_reads_the_same_chip_every_run(tiny_model):
    model = _ahwa(tiny_model)

    def logits(m):
        return m(IDS).logits

    torch.manual_seed(1)
    first = scores_under_noise(model, logits, None, [0])[0]
    torch.manual_seed(2)  # the global RNG must not matter
    again = scores_under_noise(model, logits, None, [0])[0]
    assert torch.equal(first, again)
    other = scores_under_noise(model, logits, None, [1])[0]
    assert not torch.equal(first, other)  # the seed is the chip's read noise


def test_generators_are_put_back_after_the_condition(tiny_model):
    model = _ahwa(tiny_model)
    layers = afm.analog_layers(model).values()
    assert all(layer.noise_generator is None for layer in layers)
    for _ in programmed(model, None, [0]):
        assert all(layer.noise_generator is not None for layer in layers)
    assert all(layer.noise_generator is None for layer in layers)
