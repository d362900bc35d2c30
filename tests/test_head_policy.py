"""The output head's policy (issue 17, spec §7): an explicit choice per preset, in
``afm-train``, ``afm-eval`` (convert and deployment noise) and ``afm-lora``.

The AFM repository converts every nn.Linear, the head included (example.py:
``convert_to_analog`` with no exclusions), and its apply_noise_model.py perturbs every
linear layer; the AHWA-LoRA code converts its task head (qa_outputs) too.
"""

from __future__ import annotations

import pytest
import torch

import afm
from afm.analog.layers import AnalogLinear
from afm.analog.noise import PCMProgrammingNoise, apply_noise_, select_noise_layers
from afm.evaluate.loading import load_model_spec
from afm.evaluate.specs import EvalInputError, ModelSpec
from afm.lora.experiment import LoraExperiment, _noise_models, _noise_seeds
from afm.presets import PRESETS, analog_head_of
from afm.training.run_config import ConfigError, build_run_config


def test_presets_state_their_head_policy():
    assert analog_head_of("afm-paper")  # the AFM protocol: head analog and noisy
    assert analog_head_of("tiny-stress")  # afm-paper's protocol on the tiny demos
    assert analog_head_of("ahwa-lora")  # the AHWA-LoRA code converts its task head
    assert not analog_head_of("w4a8-qat") and not analog_head_of("ideal")
    assert all(isinstance(p.analog_head, bool) for p in PRESETS.values())


def test_deployment_noise_reaches_the_head_exactly_when_it_is_analog(tiny_model):
    llama = tiny_model("llama")  # head tied to the embeddings
    assert "lm_head" not in select_noise_layers(llama)  # digital head: noise-free
    assert "lm_head" in select_noise_layers(llama, skip_lm_head=False)
    afm.convert(llama, afm.get_preset("afm-paper"), convert_lm_head=True)
    assert isinstance(llama.lm_head, AnalogLinear)
    assert "lm_head" in select_noise_layers(llama)
    assert "lm_head" not in select_noise_layers(llama, skip_lm_head=True)
    before = llama.lm_head.weight.detach().clone()
    emb = llama.get_input_embeddings().weight.detach().clone()
    with apply_noise_(llama, PCMProgrammingNoise(), seed=0):
        assert not torch.equal(llama.lm_head.weight, before)
        assert torch.equal(llama.get_input_embeddings().weight, emb)
    assert torch.equal(llama.lm_head.weight, before)


def test_afm_train_head_policy():
    cfg = build_run_config("tiny", "/tmp/unused", preset="afm-paper")
    assert cfg.analog_head is None and cfg.head_is_analog()
    cfg = build_run_config("tiny", "/tmp/unused", sets=["analog_head=false"])
    assert not cfg.head_is_analog()
    cfg = build_run_config("tiny", "/tmp/unused", preset="w4a8-qat")
    assert not cfg.head_is_analog()
    with pytest.raises(ConfigError, match="analog_head"):
        build_run_config("tiny", "/tmp/unused", sets=["analog_head=maybe"])


def test_afm_eval_head_policy():
    model, _ = load_model_spec(ModelSpec.parse("path=tiny,preset=afm-paper,calib=none"))
    assert isinstance(model.lm_head, AnalogLinear)
    model, _ = load_model_spec(
        ModelSpec.parse("path=tiny,preset=afm-paper,head=digital,calib=none")
    )
    assert not isinstance(model.lm_head, AnalogLinear)
    assert len(afm.analog_layers(model)) > 0
    with pytest.raises(EvalInputError, match="needs preset"):
        load_model_spec(ModelSpec.parse("path=tiny,head=analog"))
    with pytest.raises(EvalInputError, match="head="):
        load_model_spec(ModelSpec.parse("path=tiny,preset=afm-paper,head=half"))


def test_afm_lora_defaults_to_the_presets_evaluation_protocol():
    exp = LoraExperiment(base="tiny", task="mul", output="/tmp/unused")
    conditions = _noise_models(exp)
    assert [label for label, _ in conditions][1:] == [
        f"pcm-drift t={t}" for t in ("0s", "1h", "1d", "1w", "1mo", "1y", "10y")
    ]
    assert all(nm.mode == "aihwkit" and nm.tile_size == 512 for _, nm in conditions[1:])
    assert _noise_seeds(exp) == 10
    exp = LoraExperiment(base="tiny", task="mul", output="/tmp/unused", noise="pcm")
    assert [nm.name for _, nm in _noise_models(exp)[1:]] == ["pcm"]


def test_a_programmed_chip_reads_its_eval_output_noise_from_the_seed(tiny_model):
    # ahwa-lora keeps output noise at inference; apply_noise_ seeds it per chip and layer.
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("ahwa-lora"))
    ids = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for _ in range(2):
        with torch.no_grad(), apply_noise_(model, PCMProgrammingNoise(), seed=4):
            outs.append(model(ids).logits)
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad(), apply_noise_(model, PCMProgrammingNoise(), seed=5):
        assert not torch.equal(model(ids).logits, outs[0])
    assert all(m.noise_generator is None for m in afm.analog_layers(model).values())
