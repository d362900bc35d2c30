"""The tools users already run: lm-eval's CLI with ``--model afm``, stock ``lm_eval --model
hf`` on an afm checkpoint, ``transformers.pipeline`` on an afm directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def afm_checkpoint(tmp_path_factory, toy_llama):
    import afm

    model, tok = toy_llama(max_positions=128)
    afm.convert(model, afm.presets.get_preset("afm-paper"))
    d = tmp_path_factory.mktemp("afm-ckpt")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_afm_lm_eval_runs_a_bundled_task_with_noise(afm_checkpoint, tmp_path, capsys):
    from afm.cli import lm_eval as cli

    out = tmp_path / "results"
    rc = cli.main(
        [
            "--model", "afm",
            "--model_args", f"pretrained={afm_checkpoint},noise=pcm,noise_seed=7",
            "--tasks", "toyworld_arith", "--limit", "2", "--device", "cpu",
            "--batch_size", "2", "--output_path", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    assert "toyworld_arith" in capsys.readouterr().out  # lm-eval's own table
    (results,) = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert "exact_match,answer" in data["results"]["toyworld_arith"]
    assert data["config"]["afm_noise_seed"] == 7 and data["config"]["afm_noise"]["name"] == "pcm"


def test_afm_lm_eval_bad_model_args_are_one_line(afm_checkpoint, capsys):
    from afm.cli import lm_eval as cli

    rc = cli.main(
        ["--model", "afm", "--model_args", f"pretrained={afm_checkpoint},noise=no-such-noise",
         "--tasks", "toyworld_arith", "--limit", "1", "--device", "cpu"]
    )  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("afm-lm-eval")]
    assert rc == 2 and len(err) == 1 and "no-such-noise" in err[0]
    rc = cli.main(
        [
            "--model",
            "afm",
            "--model_args",
            f"pretrained={afm_checkpoint}",
            "--tasks",
            "toyworld_arith",
            "--limit",
            "1",
        ]
    )  # fmt: skip  (lm-eval's CLI defaults to cuda:0)
    err = capsys.readouterr().err
    assert rc == 2 and "pass --device cpu" in err


def test_stock_lm_eval_hf_refuses_an_afm_checkpoint_without_afm(afm_checkpoint):
    """What users get from ``lm_eval --model hf`` (afm not imported): a loud failure."""
    from afm.evaluate.specs import bundled_tasks_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={afm_checkpoint}", "--tasks", "toyworld_arith", "--limit", "1",
         "--include_path", str(bundled_tasks_dir()), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Unknown quantization type, got afm" in proc.stderr


def test_pipeline_on_an_afm_directory(afm_checkpoint):
    import transformers

    import afm

    pipe = transformers.pipeline("text-generation", model=str(afm_checkpoint), device="cpu")
    # loaded analog (the 7 linear maps of each of the 2 blocks), not as plain Linear
    assert len(afm.analog_layers(pipe.model)) == 14
    out = pipe("12 + 7 =", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("12 + 7 =")


def test_lm_eval_hf_model_after_import_afm_loads_the_analog_layers(afm_checkpoint):
    """What ``afm-lm-eval --model hf`` does (afm imported): the checkpoint stays analog."""
    from lm_eval.models.huggingface import HFLM

    import afm

    lm = HFLM(pretrained=str(afm_checkpoint), device="cpu")
    assert len(afm.analog_layers(lm.model)) == 14
