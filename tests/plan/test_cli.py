"""afm-plan sensitivity / place end to end on a tiny model, and one-line errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import afm
from afm.analog.hf import read_quantization_config
from afm.cli import plan as plan_cli
from afm.evaluate.loading import load_model_spec
from afm.evaluate.loop import programmed
from afm.evaluate.specs import ModelSpec
from afm.plan.metrics import make_metrics


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, sensitive_dir, texts_file):
    out = tmp_path_factory.mktemp("sweep")
    assert plan_cli.main(["sensitivity", *_common(sensitive_dir, texts_file, out)]) == 0
    return out


def _common(model_dir, texts_file, out):
    # the short texts calibrate too (quick); afm-eval's calib= takes the same file; the
    # head stays digital (afm-paper's policy is analog) so that one fragile layer decides
    args = ["--model", model_dir, "--texts", texts_file, "--calib", texts_file, "--limit", "8"]
    return [*args, "--head", "digital", "--out", str(out), "--quiet"]


def test_sensitivity_writes_the_ranked_table_json_and_plot(sweep_dir, sensitive_layer):
    data = json.loads((sweep_dir / "sensitivity.json").read_text())
    assert data["meta"]["preset"] == "afm-paper" and data["meta"]["seeds"] == [0, 1, 2]
    assert data["meta"]["noise"]["name"] == "pcm" and len(data["units"]) == 7
    table = (sweep_dir / "sensitivity.md").read_text()
    first_row = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert sensitive_layer in first_row
    assert (sweep_dir / "sensitivity.png").stat().st_size > 1000


def test_place_writes_a_placement_afm_eval_reproduces(
    sweep_dir, sensitive_dir, texts_file, sensitive_layer, tmp_path
):
    out = tmp_path / "place"
    args = ["place", *_common(sensitive_dir, texts_file, out), "--max-kl", "0.02"]
    assert plan_cli.main([*args, "--sensitivity", str(sweep_dir / "sensitivity.json")]) == 0
    report = json.loads((out / "place.json").read_text())
    assert report["digital"] == [sensitive_layer] and report["verification"]["passed"]
    assert report["ranking_from"].endswith("sensitivity.json")
    assert not (out / "placement-unverified.json").exists()
    placement = read_quantization_config(out / "placement.json")
    assert sensitive_layer not in placement.modules and len(placement.modules) == 6
    # afm-eval's loader with the same placement: same calibration, same chip, same numbers
    spec = ModelSpec(sensitive_dir, placement=str(out / "placement.json"), calib=texts_file)
    model, _ = load_model_spec(spec)
    assert sensitive_layer not in afm.analog_layers(model)
    fp = AutoModelForCausalLM.from_pretrained(sensitive_dir).eval()
    _, held_out = make_metrics(
        tokenizer=AutoTokenizer.from_pretrained(sensitive_dir), fp_model=fp,
        texts=texts_file, metric="kl", limit=8,
    )  # fmt: skip
    noise = afm.analog.noise.get_noise_model("pcm")
    seeds = report["verification"]["seeds"]
    scores = [held_out.score(model) for _ in programmed(model, noise, seeds)]
    assert scores == pytest.approx(report["verification"]["scores"], rel=1e-6)
    assert "budget **met**" in (out / "place.md").read_text()


def test_a_kl_ranking_can_order_a_placement_on_another_metric(
    sweep_dir, sensitive_dir, texts_file, tmp_path
):
    out = tmp_path / "ppl"
    args = ["place", *_common(sensitive_dir, texts_file, out), "--metric", "ppl"]
    args += ["--max-ppl-increase", "1000", "--sensitivity", str(sweep_dir / "sensitivity.json")]
    assert plan_cli.main(args) == 0
    report = json.loads((out / "place.json").read_text())
    assert report["meta"]["metric"] == "ppl" and report["ranking_metric"].startswith("kl on")
    assert report["digital"] == [] and report["verification"]["passed"]  # a loose budget


def test_the_preset_s_analog_head_is_a_unit_like_any_layer(
    sensitive_dir, texts_file, sensitive_layer, tmp_path
):
    out = tmp_path / "head"
    args = ["place", "--model", sensitive_dir, "--texts", texts_file, "--calib", texts_file]
    args += ["--limit", "8", "--seeds", "2", "--max-kl", "0.02", "--out", str(out), "--quiet"]
    assert plan_cli.main(args) == 0
    report = json.loads((out / "place.json").read_text())
    assert report["meta"]["head"] == "analog" and report["n_units"] == 8  # afm-paper's policy
    assert "lm_head" in report["ranking"] and report["verification"]["passed"]
    placement = read_quantization_config(out / "placement.json")
    assert ("lm_head" in placement.modules) != ("lm_head" in report["digital"])
    assert sensitive_layer in report["digital"]
    assert "(output head analog)" in (out / "place.md").read_text()


def test_place_exits_1_and_marks_the_file_unverified_when_held_out_fails(
    sweep_dir, sensitive_dir, texts_file, tmp_path, monkeypatch, capsys
):
    from afm.plan import command

    real = command.verify_placement

    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        return {**result, "passed": False}

    monkeypatch.setattr(command, "verify_placement", failing)
    out = tmp_path / "place"
    args = ["place", *_common(sensitive_dir, texts_file, out), "--max-kl", "0.02"]
    rc = plan_cli.main([*args, "--sensitivity", str(sweep_dir / "sensitivity.json")])
    assert rc == 1
    assert "held-out check failed" in capsys.readouterr().err
    assert (out / "placement-unverified.json").exists() and not (out / "placement.json").exists()
    assert "budget **NOT met**" in (out / "place.md").read_text()


def _one_line(capsys, rc):
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.strip()]
    err = [e for e in err if not e.startswith(("Loading weights", "["))]
    assert rc == 2 and len(err) == 1 and err[0].startswith("afm-plan: error:"), err
    return err[0]


def test_bad_input_is_one_line_with_exit_2(sweep_dir, sensitive_dir, texts_file, tmp_path, capsys):
    common = _common(sensitive_dir, texts_file, tmp_path / "x")
    budget = tmp_path / "budget.yaml"
    budget.write_text("max_kl: 0.02\nkeep_digital: [model.layers.0.mlp.down_prj]\n")
    cases = [
        (["place", *common, "--budget", str(budget)], "did you mean model.layers.0.mlp.down_proj"),
        (["place", *common, "--max-kl", "-1"], "impossible"),
        (["place", *common, "--max-kl", "0.1", "--max-drop", "1"], "exactly one of"),
        (["place", *common, "--max-drop", "1"], "use max_kl"),
        (
            ["place", *common, "--max-kl", "0.001", "--keep-analog", "model.layers.0.mlp.down_proj",
             "--sensitivity", str(sweep_dir / "sensitivity.json")],
            "impossible budget",
        ),
        (
            ["place", *common, "--max-kl", "0.02", "--preset", "tiny-stress",
             "--sensitivity", str(sweep_dir / "sensitivity.json")],
            "was measured with preset='afm-paper'",
        ),
        (
            ["place", *common, "--max-kl", "0.02", "--head", "analog",
             "--sensitivity", str(sweep_dir / "sensitivity.json")],
            "was measured with head='digital'",
        ),
        (["sensitivity", *common, "--task", "toyworld_arith"], "not both or none"),
        (["sensitivity", *common, "--preset", "nope"], "unknown preset"),
        (["sensitivity", *common, "--seeds", "0"], "seeds=0"),
        (["sensitivity", "--model", str(tmp_path / "none"), "--texts", texts_file], "not found"),
        ([], "required"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert needle in _one_line(capsys, plan_cli.main(argv)), argv
