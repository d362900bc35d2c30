"""afm-train on the user's own corpus, watched (log lines, trackers) and extended."""

from __future__ import annotations

import itertools
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from afm import toyworld as tw
from afm.cli import train as train_cli
from afm.training.distill_config import DistillConfig
from afm.training.engines import check_launch, make_accelerator

SMALL = [
    "--set", "data.seq_len=16",
    "--set", "train.max_steps=3",
    "--set", "train.per_device_batch_size=4",
    "--set", "train.calibration_batches=1",
    "--set", "train.save_steps=2",
    "--set", "train.logging_steps=1",
    "--set", "train.lr=1e-3",
    "--set", "train.warmup_ratio=0",
    "--set", "num_threads=1",
]  # fmt: skip


def _rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_own_corpus_run_is_logged_tracked_and_extended(model_dir, tmp_path, caplog, capsys):
    from transformers import AutoModelForCausalLM

    import afm

    corpus = tmp_path / "my.jsonl"
    docs = itertools.islice(tw.training_documents(), 80)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "run"
    argv = ["--model", model_dir, "--output", str(out), "--progress", "log", *SMALL,
            "--preset", "ideal",
            "--set", f"corpus.path={corpus}", "--set", "train.report_to=[tensorboard]"]  # fmt: skip
    caplog.set_level(logging.INFO)
    assert train_cli.main(argv) == 0
    assert (out / "corpus" / "stats.json").exists() and not (out / "data").exists()
    assert len(afm.analog_layers(AutoModelForCausalLM.from_pretrained(out))) == 14  # digital head
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("distilling on 1 process(es), device cpu") for m in lines)
    steps = [m for m in lines if m.startswith("step ")]
    assert len(steps) == 3 and "step 3/3  loss " in steps[-1] and "tokens/s  ETA" in steps[-1]
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "checkpoint-0000003").is_dir()  # the last step is saved
    capsys.readouterr()

    # extend: max_steps 3 -> 5 resumes at the step-3 checkpoint on the schedule of 5 steps
    keep = ["--set", "train.save_total_limit=3"]
    assert train_cli.main([*argv, "--set", "train.max_steps=5", *keep]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from"] == 3
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # linear decay to 0 over 5 steps: after step 4 the lr is 1e-3 * (1 - 4/5); the
    # old 3-step schedule would give 0 there
    assert rows[3]["lr"] == pytest.approx(2e-4) and rows[4]["lr"] == pytest.approx(0.0)
    # ... and step 4 itself ran at the new schedule's lr (4e-4), not the old one's 0
    ckpts = out / "checkpoints"
    at3, at4 = (
        load_file(str(ckpts / f"checkpoint-000000{s}" / "model.safetensors")) for s in (3, 4)
    )
    assert any(not torch.equal(at3[k], at4[k]) for k in at3)
    # shortening is refused, nothing written
    capsys.readouterr()
    rc = train_cli.main([*argv, "--set", "train.max_steps=4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "can only raise it" in err and "train.max_steps=4" in err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 5


def test_accelerate_cpu_launch_of_one_process_is_refused(monkeypatch):
    one = SimpleNamespace(num_processes=1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="started one process.*torchrun --nproc_per_node N"):
        check_launch(one)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: fine
    check_launch(one)
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(one)  # plain accelerate launch --cpu


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch, tmp_path):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ImportError, match="train.report_to: tracker 'wandb' is not installed"):
        make_accelerator(DistillConfig(report_to=["wandb"]), tmp_path)
    with pytest.raises(ValueError, match="train.report_to=.*must be a list of tracker names"):
        DistillConfig(report_to=["tensorbored"])


def test_a_mixture_with_cached_targets_is_distilled_from_the_live_teacher(
    model_dir, tmp_path, caplog, capsys
):
    corpus = tmp_path / "my.jsonl"
    docs = itertools.islice(tw.training_documents(), 80)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["--model", model_dir, *SMALL, "--preset", "ideal", "--set", "eval.enabled=false",
            "--set", f"corpus.path={corpus}", "--set", "corpus.mix=0.5",
            "--set", "data.num_tokens=2048", "--set", "data.sequences_per_shard=64",
            "--set", "data.targets=top_k"]  # fmt: skip
    caplog.set_level(logging.INFO)
    assert train_cli.main([*argv, "--output", str(tmp_path / "mix")]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("hold no cached teacher targets" in m for m in lines)
    assert not any(m.startswith("training on the cached") for m in lines)
    capsys.readouterr()
    # asking for the cached targets explicitly is refused (the corpus rows have none)
    rc = train_cli.main(
        [*argv, "--output", str(tmp_path / "mix2"), "--set", "train.kd_targets=top_k"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "train.kd_targets='top_k' with corpus.path" in err[-1]
    assert not (tmp_path / "mix2").exists()  # refused before anything is written
