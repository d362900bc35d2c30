"""Issue 15 §4: damaged checkpoints, killed saves and half-written logs never corrupt a
run: it resumes from the newest intact checkpoint on the same trajectory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import state_snapshot

from afm.training.checkpoint import MANIFEST, list_checkpoints, remove_unfinished
from afm.training.data import generate_synthetic_data
from afm.training.data_config import SyntheticDataConfig
from afm.training.distill import distill, make_student
from afm.training.distill_config import DistillConfig
from afm.training.files import DamagedFileError, write_text_atomic
from afm.training.shards import complete_shards


@pytest.fixture(scope="module")
def setup(toy_llama):
    from datasets import Dataset

    teacher, tok = toy_llama(max_positions=64)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, len(tok), (32, 12), generator=g).tolist()
    return teacher, tok, Dataset.from_dict({"input_ids": rows})


CFG = DistillConfig(
    max_steps=6,
    per_device_batch_size=4,
    lr=3e-3,
    save_steps=2,
    save_total_limit=None,
    calibration_batches=1,
    logging_steps=1,
)


def _steps_logged(out):
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    teacher, _, ds = setup
    student = make_student(teacher)
    distill(teacher, student, ds, CFG, tmp_path_factory.mktemp("straight"), progress=False)
    return state_snapshot(student)


def _killed_after(setup, out, steps):
    teacher, _, ds = setup
    distill(teacher, make_student(teacher), ds, CFG, out, max_steps_this_run=steps, progress=False)


def _resume(setup, out):
    teacher, _, ds = setup
    student = make_student(teacher)
    result = distill(teacher, student, ds, CFG, out, progress=False)
    return result, state_snapshot(student)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("damage", ["truncate weights", "garbage trainer_state", "no rng file"])
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(
    setup, straight, tmp_path, caplog, damage
):
    out = tmp_path / "run"
    _killed_after(setup, out, 4)
    newest = out / "checkpoints" / "checkpoint-0000004"
    if damage == "truncate weights":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage trainer_state":
        (newest / "trainer_state.json").write_text('{"step": 4, "skipped')
    else:
        (newest / "rng-rank0.safetensors").unlink()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a row half-written by the killed run
    with caplog.at_level(logging.WARNING):
        result, resumed = _resume(setup, out)
    assert result.resumed_from == 2
    assert "checkpoint-0000004 is damaged" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-0000002, the newest intact" in caplog.text
    _assert_same(straight, resumed)
    assert _steps_logged(out) == [1, 2, 3, 4, 5, 6]  # cut back to step 2, no duplicates
    # the resumed run saved its own checkpoints, the last step's included
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "checkpoint-0000006"


def test_every_checkpoint_damaged_starts_over_on_the_same_trajectory(setup, straight, tmp_path):
    out = tmp_path / "run"
    _killed_after(setup, out, 4)
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 16)
    result, resumed = _resume(setup, out)
    assert result.resumed_from is None
    _assert_same(straight, resumed)


def test_a_save_killed_before_its_rename_is_finished_and_a_half_save_removed(
    setup, straight, tmp_path
):
    out = tmp_path / "run"
    _killed_after(setup, out, 4)
    ckpts = out / "checkpoints"
    os.rename(ckpts / "checkpoint-0000004", ckpts / ".checkpoint-0000004.tmp")  # complete
    half = ckpts / ".checkpoint-0000006.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")  # no manifest: incomplete
    result, resumed = _resume(setup, out)
    assert result.resumed_from == 4
    assert not list(ckpts.glob(".*"))
    _assert_same(straight, resumed)


def test_a_checkpoint_without_manifest_reports_its_damaged_json_with_the_path(tmp_path):
    from afm.training.checkpoint import load_checkpoint

    ckpt = tmp_path / "checkpoint-0000002"  # written before manifests existed
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(DamagedFileError, match=r"checkpoint-0000002/trainer_state.json"):
        load_checkpoint(None, None, None, None, ckpt)


def test_remove_unfinished_keeps_finished_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    done = ckpts / "checkpoint-0000002"
    done.mkdir(parents=True)
    (done / MANIFEST).write_text('{"format": 1, "files": {}}')
    remove_unfinished(ckpts)
    assert done.is_dir()


def test_orphaned_temporary_shards_of_killed_runs_are_removed(setup, tmp_path):
    teacher, tok, _ = setup
    cfg = SyntheticDataConfig(num_tokens=64, seq_len=8, sequences_per_shard=4, batch_size=4)
    out = tmp_path / "data"
    generate_synthetic_data(teacher, tok, out, cfg, max_shards=1, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    orphan = out / f".shard-00001.tmp-{dead}"
    orphan.mkdir()
    (orphan / "data-00000-of-00001.arrow").write_bytes(b"half a shard")
    live = out / f".shard-00002.tmp-{os.getpid()}"  # a writer that still runs: kept
    live.mkdir()
    stats = generate_synthetic_data(teacher, tok, out, cfg, progress=False)
    assert stats["complete"] and complete_shards(out) == {0, 1}
    assert not orphan.exists() and live.exists()


def test_atomic_writes_leave_the_old_file_when_they_fail(tmp_path, monkeypatch):
    target = tmp_path / "run_config.json"
    target.write_text("old")

    def no_rename(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
