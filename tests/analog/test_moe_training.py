"""A tiny MoE student end to end (issue 16): afm-train on a tiny Mixtral, and DDP on 2 ranks.

The experts are analog in the trained checkpoint, their learned ranges and weights moved,
and under DDP both ranks end bit-identical with every expert matrix clipped.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
import transformers
from helpers import SMALL_TRAIN_SETS, run_two_ranks

import afm
from afm.analog.experts import AnalogExperts
from afm.cli import train as train_cli

SMALL = SMALL_TRAIN_SETS


def _tiny_mixtral(vocab: int, tok=None) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=getattr(tok, "bos_token_id", None),
        eos_token_id=getattr(tok, "eos_token_id", None),
        pad_token_id=getattr(tok, "pad_token_id", None),
    )  # fmt: skip
    return transformers.MixtralForCausalLM(cfg)


def test_afm_train_on_a_tiny_moe(toy_llama, tmp_path):
    _, tok = toy_llama()
    teacher = _tiny_mixtral(len(tok), tok)
    src = tmp_path / "teacher"
    teacher.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "run"
    assert train_cli.main(["--model", str(src), "--output", str(out), "--quiet", *SMALL]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    student = transformers.AutoModelForCausalLM.from_pretrained(out)
    experts = [m for m in student.modules() if isinstance(m, AnalogExperts)]
    assert len(experts) == 2
    cov = afm.coverage(student)
    assert cov.digital_excluded == 0 and cov.unsupported == 0
    init = experts[0].analog_config.input.init_value
    for m in experts:  # calibrated and learned: no range left at its initial value
        for rng in m.input_ranges().values():
            assert torch.isfinite(rng).all() and (rng != init).any()
    moved = teacher.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert not torch.equal(experts[0].gate_up_proj.detach(), moved)


WORKER = textwrap.dedent(
    """
    import sys
    import torch, transformers
    from accelerate import Accelerator
    from datasets import Dataset
    from safetensors.torch import save_file
    from afm.training.distill import distill, make_student
    from afm.training.distill_config import DistillConfig

    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2)
    teacher = transformers.MixtralForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 64, (32, 16), generator=g).tolist()})
    dc = DistillConfig(max_steps=3, per_device_batch_size=2, lr=2e-2, calibration_batches=1,
                       save_steps=10, logging_steps=1)
    acc = Accelerator(cpu=True)
    res = distill(teacher, make_student(teacher), ds, dc, out, accelerator=acc, progress=False)
    state = {k: v.detach().clone().contiguous() for k, v in res.model.state_dict().items()}
    save_file(state, f"{out}/rank{acc.process_index}.safetensors")
    """
)


@pytest.mark.slow
def test_ddp_moe_ranks_end_identical_and_clipped(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_two_ranks(script, str(tmp_path))
    r0 = load_file(tmp_path / "rank0.safetensors")
    r1 = load_file(tmp_path / "rank1.safetensors")
    assert sorted(r0) == sorted(r1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    sigma = afm.get_preset("afm-paper").clip.sigma
    checked = 0
    for key, w in r0.items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        assert f"{key}_input_range" in r0
        # every row of every expert clipped at sigma * its own std (the clip shrinks the
        # std a little); unclipped random rows of 32-48 entries exceed this bound
        rows = w.float().reshape(-1, w.shape[-1])
        assert (rows.abs().amax(dim=1) / rows.std(dim=1)).max() <= sigma * 1.08, key
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_master_weight_clipping_matches_the_experts_own(family):
    """The DeepSpeed path clips fp32 master copies: per expert, as AnalogExperts does."""
    from tiny_archs import build

    from afm.reference import clip_weight_
    from afm.training.engines import _clipped_weights, _crossbars

    model = build(family)
    afm.convert(model, afm.get_preset("afm-paper"))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for w in _clipped_weights(experts):
            w.normal_()
    reference = copy.deepcopy(experts)
    reference.clip_weights_()
    clip = experts.analog_config.clip
    for w, want in zip(_clipped_weights(experts), _clipped_weights(reference), strict=True):
        master = w.detach().clone().float()
        for crossbar in _crossbars(experts, master.view(w.shape)):
            clip_weight_(crossbar, clip.kind, clip.sigma)
        assert torch.equal(master, want.detach())
        assert not torch.equal(master, w.detach())  # something was clipped
