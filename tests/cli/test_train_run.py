"""Issue 15 §2–4 on ``afm-train``: a failed start leaves no trace, one run per output
directory, damaged run files named, a finished run re-evaluated when asked for other
settings, divergence stops with exit 1, an analog --model distils from its digital
weights onto the --preset chip, and the --help examples run as written."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

import afm
from afm.cli import generate as gen_cli
from afm.cli import train as train_cli
from afm.training.files import RunLock
from afm.training.run_config import build_run_config, data_config_from

SMALL = list(load_script("bad_input_drill").SMALL_TRAIN)
REPO = Path(__file__).resolve().parents[2]


def _train(fixtures, out, *args, model="model"):
    return train_cli.main(["--model", fixtures[model], "--output", str(out), *SMALL, *args])


def _error(capsys, rc, status=2):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("afm-train:")]
    assert rc == status and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "bad",
    [
        "data.prompts_file=/nonexistent/prompts.txt",  # today: run_config.* written first
        "train.per_device_batch_size=1000",  # today: data sampled, then refused
        "data.backend=vllm",
    ],
)
def test_a_failed_start_leaves_no_trace_and_the_fix_runs(fixtures, tmp_path, capsys, bad):
    out = tmp_path / "run"
    _error(capsys, _train(fixtures, out, "--set", bad))
    assert not out.exists()
    assert _train(fixtures, out) == 0  # the corrected command is not "a different run"
    assert (out / "model.safetensors").exists()


def test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_taken(
    fixtures, tmp_path, capsys, caplog
):
    out = tmp_path / "run"
    with RunLock(out, "afm-train"):  # another afm-train is running here
        line = _error(capsys, _train(fixtures, out))
    assert "in use by another afm-train" in line and "pid" in line
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (out / ".afm-train.lock").write_text(json.dumps({"pid": int(dead), "host": "here"}))
    assert _train(fixtures, out) == 0  # the killed run's lock is stale: taken over
    assert "stale lock of pid " + dead in caplog.text
    assert not (out / ".afm-train.lock").exists()  # released


@pytest.mark.parametrize("name", ["run_config.json", "train_summary.json"])
def test_a_damaged_run_file_is_named(fixtures, tmp_path, capsys, name):
    out = tmp_path / "run"
    assert _train(fixtures, out) == 0
    (out / name).write_text('{"model": "half')
    line = _error(capsys, _train(fixtures, out))
    assert f"{out / name}" in line and "damaged" in line


def test_divergence_stops_with_exit_1_and_saves_nothing(fixtures, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _train(
        fixtures, out, "--set", "train.lr=1e30", "--set", "train.max_consecutive_skips=2",
        "--set", "train.max_steps=6",
    )  # fmt: skip
    line = _error(capsys, rc, status=1)
    assert "2 steps in a row were skipped" in line
    assert not (out / "model.safetensors").exists() and not (out / "train_summary.json").exists()


def test_an_analog_model_is_distilled_from_its_digital_weights_onto_the_new_chip(
    fixtures, tmp_path, monkeypatch, caplog
):
    from afm.training import run as run_module

    seen = {}
    real_distill = run_module.distill

    def spy(teacher, student, *args, **kwargs):
        seen["teacher_analog_layers"] = len(afm.analog_layers(teacher))
        seen["student_chips"] = {la.analog_config for la in afm.analog_layers(student).values()}
        return real_distill(teacher, student, *args, **kwargs)

    monkeypatch.setattr(run_module, "distill", spy)
    out = tmp_path / "run"
    # the live teacher (the default trains from cached targets, which it generated)
    live = ("--set", "train.kd_targets=live")
    assert _train(fixtures, out, "--preset", "ideal", *live, model="analog") == 0
    assert seen["teacher_analog_layers"] == 0  # the teacher is digital
    assert seen["student_chips"] == {afm.get_preset("ideal")}  # the new chip, not afm-paper
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "afm"
    assert "digital weights" in caplog.text


def test_a_finished_run_with_other_eval_settings_is_evaluated_again(tmp_path, capsys):
    out = tmp_path / "tiny"
    small_eval = ["--set", "eval.n_per_kind=1", "--set", "eval.facts=false",
                  "--set", "eval.calibration_batches=1"]  # fmt: skip
    args = ["--model", "tiny", "--output", str(out), *SMALL, *small_eval]
    assert train_cli.main([*args, "--set", "eval.seeds=1"]) == 0
    first = json.loads((out / "eval.json").read_text())
    assert first["seeds"] == [0]
    capsys.readouterr()
    assert train_cli.main([*args, "--set", "eval.seeds=2"]) == 0
    printed = capsys.readouterr().out
    assert "evaluated it again" in printed and "2 noise seeds" in printed
    assert json.loads((out / "eval.json").read_text())["seeds"] == [0, 1]
    assert json.loads((out / "run_config.json").read_text())["eval"]["seeds"] == 2
    assert train_cli.main([*args, "--set", "eval.seeds=2"]) == 0  # now the same: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def _help_sets(module) -> list[str]:  # noqa: ANN001
    """The ``--set KEY=VALUE`` examples of a CLI's --help (not the placeholder)."""
    text = module._parser().format_help() + " "
    found = re.findall(r"--set ([a-z_][\w.]*=\S+?)[`\s]", text)
    return [s for s in found if s != "key=value"]


def test_the_help_examples_run_as_written():
    sets = _help_sets(train_cli)
    assert "data.num_tokens=1e6" in sets  # refused as "must be an int" before
    cfg = build_run_config("tiny", "runs/x", sets=sets)
    assert cfg.data.num_tokens == 1_000_000 and cfg.train.lr == 1e-4
    gen_sets = _help_sets(gen_cli)
    assert gen_sets and data_config_from(None, gen_sets).num_tokens == 200_000


def _doc_examples(module, prog: str) -> list[list[str]]:  # noqa: ANN001
    """The example command lines of a CLI's docstring (continuations joined)."""
    text = module.__doc__.replace("\\\n", " ")
    return [
        shlex.split(ln.strip())[1:] for ln in text.splitlines() if ln.strip().startswith(prog + " ")
    ]


@pytest.mark.parametrize("name", ["train", "generate", "evaluate", "lora"])
def test_every_help_example_parses_and_resolves(name, monkeypatch):
    module = importlib.import_module(f"afm.cli.{name}")
    examples = _doc_examples(module, module.PROG)
    assert examples, f"{module.PROG} --help shows no example"
    monkeypatch.chdir(REPO)  # the examples' config paths are relative to the repository
    for argv in examples:
        args = module._parser().parse_args(argv)  # a usage error exits: the test fails
        if name == "train":
            build_run_config(args.model, args.output, preset=args.preset,
                             config_file=args.config, sets=args.set)  # fmt: skip
        elif name == "generate":
            data_config_from(args.config, args.set)


def test_nothing_is_left_in_a_new_output_when_the_model_is_truncated(fixtures, tmp_path, capsys):
    out = tmp_path / "run"
    line = _error(capsys, _train(fixtures, out, model="trunc"))
    assert f"{Path(fixtures['trunc']) / 'model.safetensors'}" in line
    assert not out.exists()
