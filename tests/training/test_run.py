"""afm-train / afm-generate: config resolution, one-line errors, an end-to-end tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SMALL_TRAIN_SETS

from afm.cli import generate as gen_cli
from afm.cli import train as train_cli
from afm.training.run_config import MODEL_DEFAULTS, ConfigError, build_run_config, load_yaml

REPO = Path(__file__).resolve().parents[2]
SMALL = SMALL_TRAIN_SETS


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if not e.startswith("Loading weights")]
    assert rc == 2
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_end_to_end_run_resume_and_refusals(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import afm

    out = tmp_path / "run"
    rc = train_cli.main(["--model", model_dir, "--output", str(out), "--quiet", *SMALL])
    assert rc == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["preset"] == "afm-paper"
    assert (out / "run_config.yaml").exists() and (out / "data" / "stats.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(afm.analog_layers(loaded)) == 15  # afm-paper: the head is analog too (spec §7)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    capsys.readouterr()
    # the same command again: nothing to do
    assert train_cli.main(["--model", model_dir, "--output", str(out), "--quiet", *SMALL]) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    # a different run in the same directory is refused, nothing overwritten
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = train_cli.main(
        ["--model", model_dir, "--output", str(out), *SMALL, "--set", "train.lr=0.5"]
    )
    line = _one_line_error(capsys, rc)
    assert "different run" in line and "train.lr" in line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    # data reuse: a second output directory pointing at the first one's data
    out2 = tmp_path / "run2"
    rc = train_cli.main(
        [
            "--model", model_dir, "--output", str(out2), "--quiet", *SMALL,
            "--set", f"data_dir={out / 'data'}", "--set", "generate=false",
        ]
    )  # fmt: skip
    assert rc == 0 and not (out2 / "data").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "no-such-alias-xyz"], "cannot load model"),
        (["--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["--set", "train.lr=abc"], "train.lr='abc' is invalid"),
        (["--set", "train.lr"], "expected key=value"),
        (["--set", "bogus=1"], "unknown key 'bogus'"),
        (["--preset", "no-such-preset"], "unknown preset"),
        (["--set", "generate=false"], "generate=false needs data to train on"),
        (["--config", "/nonexistent/run.yaml"], "does not exist"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_with_one_line(model_dir, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = ["--output", str(out), *args]
    if "--model" not in args:
        argv = ["--model", model_dir, *argv]
    try:
        rc = train_cli.main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    line = _one_line_error(capsys, rc)
    assert needle in line
    assert not out.exists()  # nothing written


def test_missing_or_empty_data(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    rc = train_cli.main(
        ["--model", model_dir, "--output", str(out), "--set", f"data_dir={empty}",
         "--set", "generate=false"]
    )  # fmt: skip
    assert "holds no shards" in _one_line_error(capsys, rc)
    assert not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc = train_cli.main(["--model", model_dir, "--output", str(foreign)])
    assert "holds no afm-train run" in _one_line_error(capsys, rc)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_config_precedence_and_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "model: tiny\npreset: ideal\ntrain:\n  lr: 1.0e-4\n  max_steps: 7\n"
        "data:\n  seq_len: 64\neval:\n  seeds: 2\n"
    )
    cfg = build_run_config(None, "o", config_file=str(run), sets=["train.lr=2e-4"])
    assert cfg.model == "tiny" and cfg.preset == "ideal"  # YAML over alias defaults
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7  # --set over YAML
    assert cfg.data.seq_len == 64 and cfg.eval.seeds == 2
    assert cfg.data.num_tokens == MODEL_DEFAULTS["tiny"]["data"]["num_tokens"]  # alias default
    cfg = build_run_config("tiny", "o", preset="afm-paper", config_file=str(run))
    assert cfg.preset == "afm-paper"  # the flag over YAML
    with pytest.raises(ConfigError, match="no output"):
        build_run_config("tiny", None)


def test_tiny_yaml_matches_the_alias_defaults():
    data = load_yaml(REPO / "configs" / "train" / "tiny.yaml")
    assert data["model"] == "tiny"
    for section, values in MODEL_DEFAULTS["tiny"].items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert data[section][k] == pytest.approx(v), f"{section}.{k}"
        else:
            assert data[section] == values


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml"))
)
def test_shipped_run_yamls_resolve(name):
    from afm.presets import PRESETS

    sets = [] if "tiny-stress" in PRESETS else ["preset=afm-paper"]
    cfg = build_run_config(None, "o", config_file=str(REPO / "configs" / "train" / name), sets=sets)
    assert cfg.train.lr > 0 and cfg.data.num_tokens > 0


def test_generate_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["--model", model_dir, "--output", str(out), "--quiet", "--set", "num_tokens=64",
            "--set", "data.seq_len=8", "--set", "sequences_per_shard=4"]  # fmt: skip
    assert gen_cli.main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokens"] == 64 and stats["complete"]
    rc = gen_cli.main([*args, "--set", "temperature=0.5"])
    assert "different recipe" in _one_line_error(capsys, rc)
    rc = gen_cli.main([*args[:4], "--set", "nope=1"])
    assert "unknown key 'nope'" in _one_line_error(capsys, rc)


def test_preset_overrides_change_the_student_and_eval_chip():
    cfg = build_run_config(
        "tiny", "o", preset="afm-paper", sets=["preset_overrides={weight_noise.std: 0.08}"]
    )
    assert cfg.student_chip().weight_noise.std == 0.08
    assert cfg.eval_chip() == cfg.student_chip()
    assert "weight_noise.std=0.08" in cfg.eval_chip_name
    cfg = build_run_config("tiny", "o", preset="afm-paper", sets=["eval.preset=ideal"])
    assert cfg.eval_chip().input.bits is None
    with pytest.raises(ConfigError, match="no_such"):
        build_run_config("tiny", "o", sets=["preset_overrides={no_such.field: 1}"])
    with pytest.raises(ConfigError, match="eval.preset|unknown preset"):
        build_run_config("tiny", "o", sets=["eval.preset=nope"])


def test_eval_noise_defaults_to_the_chip_presets_own_noise():
    from afm import presets

    cfg = build_run_config("tiny", "o", preset="afm-paper")
    if hasattr(presets, "eval_noise_of"):
        assert cfg.eval_noise() == presets.eval_noise_of("afm-paper")
    assert cfg.eval_noise()["name"] == "pcm"
    cfg = build_run_config("tiny", "o", sets=["eval.noise_scale=5", "eval.preset=afm-paper"])
    assert cfg.eval_noise()["scale"] == 5.0
    cfg = build_run_config("tiny", "o", sets=["eval.noise=gaussian"])
    assert cfg.eval_noise() == {"name": "gaussian"}
    with pytest.raises(ConfigError, match="noise"):
        build_run_config("tiny", "o", sets=["eval.noise=nope"])
