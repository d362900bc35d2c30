"""Issue 15 §3: a step that would make weights or ranges non-finite is not applied,
too many skipped steps in a row stop training, a non-finite model is never saved."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from helpers import state_snapshot
from torch.optim.optimizer import register_optimizer_step_post_hook

from afm.training.distill import distill, make_student, save_student
from afm.training.distill_config import DistillConfig
from afm.training.guard import TrainingStopped, UpdateGuard, check_finite


@pytest.fixture(scope="module")
def setup(toy_llama):
    from datasets import Dataset

    teacher, tok = toy_llama(max_positions=64)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, len(tok), (32, 12), generator=g).tolist()
    return teacher, Dataset.from_dict({"input_ids": rows})


CFG = DistillConfig(
    max_steps=3,
    per_device_batch_size=4,
    lr=3e-3,
    save_steps=None,
    calibration_batches=1,
    logging_steps=1,
)


def _log(path):
    return [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]


def test_guard_restores_parameters_and_optimizer_state_bitwise():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    guard = UpdateGuard(opt, {id(p): n for n, p in lin.named_parameters()}, rollback=True)

    def step():
        lin(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()

    guard.snapshot()  # before the first update: no optimizer state yet
    step()
    guard.restore()
    assert not opt.state, "the first update's optimizer state was not dropped"
    step()
    params = [p.detach().clone() for p in lin.parameters()]
    moments = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    guard.snapshot()
    step()
    with torch.no_grad():
        lin.weight[0, 0] = math.nan
    assert not guard.params_finite() and guard.first_nonfinite() == "weight"
    guard.restore()
    assert guard.params_finite()
    for p, before in zip(lin.parameters(), params, strict=True):
        assert torch.equal(p, before)
    for k, v in opt.state[lin.weight].items():
        assert torch.equal(v, moments[k]), k


def test_inf_gradient_without_grad_norm_clipping_is_not_applied(setup, tmp_path):
    teacher, ds = setup
    cfg = DistillConfig(**{**CFG.__dict__, "max_grad_norm": None, "max_steps": 2})
    reference = make_student(teacher)
    distill(teacher, reference, ds, cfg, tmp_path / "ref", max_steps_this_run=1, progress=False)
    student = make_student(teacher)
    weight = student.model.layers[0].self_attn.q_proj.weight
    calls = {"n": 0}

    def poison(grad):  # the second step's gradient of one weight is inf
        calls["n"] += 1
        return torch.full_like(grad, math.inf) if calls["n"] == 2 else grad

    weight.register_hook(poison)
    result = distill(teacher, student, ds, cfg, tmp_path / "run", progress=False)
    assert result.skipped_steps == 1
    a, b = state_snapshot(reference), state_snapshot(student)
    for k in a:  # step 2 was not applied: the weights are those after step 1
        assert torch.equal(a[k], b[k]), k
    log = _log(tmp_path / "run")
    assert [r["skipped_steps"] for r in log] == [0, 1]
    assert log[1]["loss"] == log[0]["loss"] == result.final_loss  # the last applied step's


@contextlib.contextmanager
def _after_each_update(fn):
    """Run ``fn(update number)`` after every optimizer step (after the clipping hook)."""
    calls = {"n": 0}

    def hook(_optimizer, _args, _kwargs):
        calls["n"] += 1
        fn(calls["n"])

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_update_that_breaks_the_weights_is_rolled_back(setup, tmp_path):
    teacher, ds = setup
    cfg = DistillConfig(**{**CFG.__dict__, "max_steps": 2})
    reference = make_student(teacher)
    distill(teacher, reference, ds, cfg, tmp_path / "ref", max_steps_this_run=1, progress=False)
    student = make_student(teacher)

    def nan_range(n):  # the second update leaves a NaN input range
        if n == 2:
            with torch.no_grad():
                student.model.layers[1].mlp.down_proj.input_range.fill_(math.nan)

    with _after_each_update(nan_range) as calls:
        result = distill(teacher, student, ds, cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 2 and result.skipped_steps == 1
    a, b = state_snapshot(reference), state_snapshot(student)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_guard_stops_instead_of_keeping_a_broken_update(setup, tmp_path):
    teacher, ds = setup
    cfg = DistillConfig(**{**CFG.__dict__, "nonfinite_guard": "stop"})
    student = make_student(teacher)

    def inf_weight(_n):
        with torch.no_grad():
            student.model.layers[0].self_attn.o_proj.weight[0, 0] = math.inf

    with _after_each_update(inf_weight), pytest.raises(TrainingStopped, match=r"step 1: .*o_proj"):
        distill(teacher, student, ds, cfg, tmp_path / "run", progress=False)


def test_too_many_skipped_steps_in_a_row_stop_training(setup, tmp_path):
    teacher, ds = setup
    cfg = DistillConfig(**{**CFG.__dict__, "max_steps": 8, "max_consecutive_skips": 3})
    calls = {"n": 0}

    def poison(_module, _args, out):  # every teacher forward after the first step
        calls["n"] += 1
        if calls["n"] > 1:  # steps 2, 3, ...: step 1 is applied
            out.logits[:] = math.nan
        return out

    student = make_student(teacher)  # before the hook: a deep copy would take it along
    handle = teacher.register_forward_hook(poison)
    try:
        with pytest.raises(TrainingStopped, match=r"3 steps in a row were skipped \(steps 2-4"):
            distill(teacher, student, ds, cfg, tmp_path, progress=False)
    finally:
        handle.remove()
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the row of the step it stopped at
    assert log[-1]["skipped_steps"] == 3


def test_a_non_finite_model_is_never_saved(setup, tmp_path):
    teacher, _ = setup
    student = make_student(teacher)
    check_finite(student, "saving")  # a finite one passes
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.input_range.fill_(math.inf)
    with pytest.raises(TrainingStopped, match=r"non-finite values .*up_proj.input_range"):
        save_student(student, tmp_path / "final")
    assert not (tmp_path / "final").exists()
