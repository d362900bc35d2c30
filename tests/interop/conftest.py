"""Checkpoints in the layout of IBM's published analog foundation models, built locally.

As IBM/analog-foundation-models ``example.py`` reads them: the FP model built from a
config, ``convert_to_analog(model, rpu_config)`` (every ``nn.Linear``, the head
included), the state dict saved with ``torch.save`` (one file, or two shards with an
index) and the ``rpu_config`` with ``dill.dump``.  aihwkit-lightning and dill are only
needed here, to write them; tests that need them skip (and say so) without.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers


def tiny_hf_config(kind: str):
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":  # tied head, as Llama-3.2-1B
        return transformers.LlamaConfig(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True
        )
    if kind == "phi3":  # fused qkv_proj / gate_up_proj, as Phi-3-mini
        return transformers.Phi3Config(
            **common,
            intermediate_size=64,
            num_key_value_heads=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(kind)


def afm_paper_rpu_config(max_input_size=None, per_channel=True, **changes):
    """IBM's training chip (config.yaml of the AFM repository) in aihwkit-lightning 2."""
    pytest.importorskip("aihwkit_lightning", reason="aihwkit-lightning is not installed")
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightClipType,
        WeightNoiseInjectionType,
    )

    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 254
    cfg.forward.out_res = 254
    cfg.forward.out_bound = 14
    cfg.forward.out_noise = 0.0
    per = (
        WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL if per_channel else WeightClipType.LAYER_GAUSSIAN
    )
    cfg.clip.type = per
    cfg.clip.sigma = 2.5
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    cfg.modifier.std_dev = 0.03
    cfg.modifier.res = -1
    cfg.mapping.max_input_size = max_input_size or -1
    ir = cfg.pre_post.input_range
    ir.enable = True
    ir.learn_input_range = True
    ir.init_value = 3.0
    ir.init_from_data = 2
    ir.init_std_alpha = 18.0
    ir.decay = 0.01
    ir.input_min_percentage = 0.95
    for path, value in changes.items():
        obj = cfg
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


@dataclass
class LightningCheckpoint:
    path: Path
    model: torch.nn.Module  # aihwkit-lightning's own model (eval mode)
    rpu_config: object

    def tokens(self, seed: int = 1, shape=(3, 24)) -> torch.Tensor:
        return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _calibrate(model, steps: int) -> None:
    """aihwkit-lightning's own range initialisation: training-mode forwards."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(100 + i)))
    model.eval()


def _save_state(state: dict, directory: Path, layout: str) -> None:
    if layout == "single":  # module.state_dict() as it is (with its _metadata)
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    half = len(keys) // 2
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:]), strict=True):
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    if layout == "shards+index":
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture
def rpu_config():
    """Factory: :func:`afm_paper_rpu_config` (aihwkit-lightning's config object)."""
    return afm_paper_rpu_config


@pytest.fixture
def lightning_checkpoint(tmp_path):
    """Factory: ``make(kind, rpu_config, layout="single", calibrate=2)`` →
    :class:`LightningCheckpoint` (a directory in IBM's layout + lightning's model)."""
    pytest.importorskip("aihwkit_lightning", reason="aihwkit-lightning is not installed")
    dill = pytest.importorskip("dill", reason="dill is not installed")
    from aihwkit_lightning.nn.conversion import convert_to_analog

    def make(kind="llama", rpu_config=None, layout="single", calibrate=2, seed=0, name="ibm"):
        rpu_config = rpu_config if rpu_config is not None else afm_paper_rpu_config()
        hf_config = tiny_hf_config(kind)
        torch.manual_seed(seed)
        model = convert_to_analog(
            transformers.AutoModelForCausalLM.from_config(hf_config), rpu_config
        )
        _calibrate(model, calibrate)
        directory = tmp_path / name
        directory.mkdir()
        hf_config.save_pretrained(directory)
        _save_state(model.state_dict(), directory, layout)
        with open(directory / "rpu_config", "wb") as f:
            dill.dump(rpu_config, f)
        return LightningCheckpoint(directory, model.eval(), rpu_config)

    return make
