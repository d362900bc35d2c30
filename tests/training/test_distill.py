"""Distillation loop: exact resume, clipping, calibration, non-finite skips, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import state_snapshot

import afm
from afm.training.checkpoint import list_checkpoints
from afm.training.distill import distill, make_student, param_groups
from afm.training.distill_config import DistillConfig


@pytest.fixture(scope="module")
def setup(toy_llama):
    from datasets import Dataset

    teacher, tok = toy_llama(max_positions=64, tie=True)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, len(tok), (48, 16), generator=g).tolist()
    rows[3] = rows[3][:9]  # one short row: padding in its batch
    return teacher, tok, Dataset.from_dict({"input_ids": rows})


CFG = DistillConfig(
    max_steps=6,
    per_device_batch_size=4,
    lr=3e-3,
    weight_decay=0.01,
    save_steps=3,
    calibration_batches=2,
    logging_steps=1,
    kd_chunk_size=7,
)


def test_resume_continues_the_same_trajectory(setup, tmp_path):
    teacher, tok, ds = setup
    t_before = state_snapshot(teacher)
    straight = make_student(teacher)
    r1 = distill(
        teacher, straight, ds, CFG, tmp_path / "a", pad_id=tok.pad_token_id, progress=False
    )
    assert r1.steps == 6 and r1.resumed_from is None and r1.skipped_steps == 0
    killed = make_student(teacher)
    r2 = distill(
        teacher,
        killed,
        ds,
        CFG,
        tmp_path / "b",
        pad_id=tok.pad_token_id,
        max_steps_this_run=3,
        progress=False,
    )
    assert r2.steps == 3
    ckpts = list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint-0000003"]
    names = {p.name for p in ckpts[0].iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "scheduler.json"} <= names
    assert "rng-rank0.safetensors" in names and "afm_config.json" in names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)  # no pickles
    resumed = make_student(teacher)  # fresh process: a new student from the teacher
    r3 = distill(teacher, resumed, ds, CFG, tmp_path / "b", pad_id=tok.pad_token_id, progress=False)
    assert r3.resumed_from == 3 and r3.steps == 6
    a, b = state_snapshot(straight), state_snapshot(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    moved = [k for k in a if not torch.equal(a[k], t_before.get(k, a[k]))]
    assert moved, "training changed nothing"
    for k, v in state_snapshot(teacher).items():  # the teacher is frozen
        assert torch.equal(v, t_before[k])
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_weights_are_clipped_and_ranges_calibrated_and_learned(setup, tmp_path):
    teacher, tok, ds = setup
    student = make_student(teacher)
    init = {n: la.input_range.detach().clone() for n, la in afm.analog_layers(student).items()}
    cfg = DistillConfig(**{**CFG.__dict__, "calibration_batches": 0})
    calibrated = make_student(teacher)
    distill(teacher, calibrated, ds, CFG, tmp_path / "c", pad_id=0, progress=False)
    uncal = make_student(teacher)
    distill(teacher, uncal, ds, cfg, tmp_path / "u", pad_id=0, progress=False)

    def ratio(w):  # max |w| / std(w) per row
        return (w.abs().amax(dim=1) / w.std(dim=1)).max().item()

    teacher_ratio = max(
        ratio(m.weight.detach())
        for n, m in teacher.named_modules()
        if n in afm.analog_layers(calibrated)
    )
    assert teacher_ratio > 2.5 * 1.08  # unclipped weights exceed the bound: the check can fail
    for name, layer in afm.analog_layers(calibrated).items():
        # clipped after the last optimizer step: |w| ≤ 2.5·std(row) (the clip itself
        # shrinks the std of a 32-wide row a little, hence the slack)
        assert ratio(layer.weight.detach()) <= layer.analog_config.clip.sigma * 1.08, name
        assert not torch.allclose(layer.input_range, init[name])  # calibrated
    r_cal = torch.cat([la.input_range for la in afm.analog_layers(calibrated).values()])
    r_unc = torch.cat([la.input_range for la in afm.analog_layers(uncal).values()])
    assert not torch.allclose(r_cal, r_unc)


def test_input_range_gets_no_weight_decay(setup):
    teacher, _, _ = setup
    student = make_student(teacher)
    groups = param_groups(student, 0.01)
    ids = {id(p) for p in groups[0]["params"]}
    for layer in afm.analog_layers(student).values():
        assert id(layer.input_range) not in ids
        assert id(layer.weight) in ids
    assert groups[1]["weight_decay"] == 0.0


def test_non_finite_loss_skips_the_step(setup, tmp_path):
    teacher, tok, ds = setup
    calls = {"n": 0}

    def poison(_module, _args, out):
        calls["n"] += 1
        if calls["n"] == 2:  # the second training batch
            out.logits[:] = float("nan")
        return out

    student = make_student(teacher)
    cfg = DistillConfig(**{**CFG.__dict__, "max_steps": 3, "save_steps": None})
    handle = teacher.register_forward_hook(poison)
    try:
        res = distill(teacher, student, ds, cfg, tmp_path, pad_id=0, progress=False)
    finally:
        handle.remove()
    assert res.skipped_steps == 1 and res.steps == 3
    for v in student.state_dict().values():
        assert torch.isfinite(v).all()
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0, 1, 1]


def test_final_directory_loads_with_from_pretrained(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from afm.training.distill import save_student

    teacher, tok, ds = setup
    student = make_student(teacher)
    cfg = DistillConfig(**{**CFG.__dict__, "max_steps": 2, "save_steps": None})
    distill(teacher, student, ds, cfg, tmp_path / "run", pad_id=0, progress=False)
    save_student(student, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert len(afm.analog_layers(loaded)) == len(afm.analog_layers(student)) > 0
    ids = torch.tensor([ds[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_config_validation_and_small_dataset(setup, tmp_path):
    teacher, _, ds = setup
    with pytest.raises(ValueError, match="train.lr"):
        DistillConfig(lr=0)
    with pytest.raises(ValueError, match="train.mixed_precision"):
        DistillConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        distill(
            teacher,
            make_student(teacher),
            ds.select(range(3)),
            CFG,
            tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="no AnalogLinear"):
        distill(teacher, teacher, ds, CFG, tmp_path, progress=False)


def test_gradient_checkpointing_keeps_the_noise_and_the_result(setup, tmp_path):
    teacher, tok, ds = setup
    results = []
    for gc in (False, True):
        student = make_student(teacher)
        cfg = DistillConfig(
            **{**CFG.__dict__, "max_steps": 2, "save_steps": None, "gradient_checkpointing": gc}
        )
        distill(teacher, student, ds, cfg, tmp_path / str(gc), pad_id=0, progress=False)
        results.append(state_snapshot(student))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


def test_w4a8_qat_baseline_trains_with_the_same_recipe(setup, tmp_path):
    """`afm-train --preset w4a8-qat`: the digital W4A8 QAT baseline of the AFM paper."""
    from afm.reference import fake_quantize_weight

    teacher, tok, ds = setup
    student = make_student(teacher, "w4a8-qat")
    layer = next(iter(afm.analog_layers(student).values()))
    before = layer.weight.detach().clone()
    cfg = DistillConfig(**{**CFG.__dict__, "max_steps": 2, "save_steps": None})
    result = distill(teacher, student, ds, cfg, tmp_path / "run", pad_id=0, progress=False)
    assert result.steps == 2 and result.skipped_steps == 0
    assert not torch.equal(layer.weight.detach(), before)  # STE gradients reached W
    assert layer.input_range.item() != afm.get_preset("w4a8-qat").input.init_value
    # The forward sees 4-bit weights: at most 15 distinct levels per row.
    q = fake_quantize_weight(layer.weight.detach(), bits=4)
    assert max(len(torch.unique(row)) for row in q) <= 15


def test_make_student_follows_the_presets_head_policy(tiny_model):
    teacher = tiny_model("llama")
    assert "lm_head" in afm.analog_layers(make_student(teacher, "afm-paper"))
    assert "lm_head" not in afm.analog_layers(make_student(teacher, "w4a8-qat"))
    assert "lm_head" not in afm.analog_layers(
        make_student(teacher, "afm-paper", convert_lm_head=False)
    )
    # a config (not a name) has no head policy: afm.convert's default, digital
    assert "lm_head" not in afm.analog_layers(make_student(teacher, afm.get_preset("afm-paper")))
