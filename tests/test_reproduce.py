"""scripts/reproduce.py: the --mini pipeline end to end, then a resume that skips all."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("afm_reproduce_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_input_hash_follows_commands_and_upstream(tmp_path: Path) -> None:
    rp = _load()
    stages = {s.name: s for s in rp.build_stages(tmp_path, rp.make_scale("tiny", True))}
    students = stages["students"]
    up = {dep: "a" * 64 for dep in students.deps}
    h = rp.input_hash(students, tmp_path, up)
    assert h == rp.input_hash(students, tmp_path, dict(up))
    changed = {**up, students.deps[0]: "b" * 64}
    assert rp.input_hash(students, tmp_path, changed) != h
    # the output directory itself is not part of the hash (paths are made relative)
    moved = {s.name: s for s in rp.build_stages(tmp_path / "x", rp.make_scale("tiny", True))}
    assert rp.input_hash(moved["students"], tmp_path / "x", up) == h
    full = {s.name: s for s in rp.build_stages(tmp_path, rp.make_scale("tiny", False))}
    assert rp.input_hash(full["students"], tmp_path, up) != h


def test_paper_scale_prints_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rp = _load()
    assert rp.main(["--scale", "paper", "--out", str(tmp_path / "paper")]) == 0
    text = capsys.readouterr().out
    assert "phi-3-mini" in text and "llama-3.2-1b" in text and "afm_paper" in text
    assert "configs/train/phi3-mini-paper.yaml" in text
    assert not (tmp_path / "paper").exists()  # printed, not run


@pytest.mark.slow
def test_mini_pipeline_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rp = _load()
    out = tmp_path / "tiny"
    names = [s.name for s in rp.build_stages(out, rp.make_scale("tiny", True))]
    expected = {"teacher", "afm-paper", "afm-stress", "w4a8", "students", "rtn-w4"}
    expected |= {"robustness", "lora", "lora-trl", "ttc"}
    assert set(names) == expected

    assert rp.main(["--scale", "tiny", "--mini", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert set(report["stages"]) == expected
    for name in names:
        rec = json.loads((out / "stages" / name / "stage.json").read_text())
        assert rec["status"] == "done" and len(rec["input_hash"]) == 64
        assert report["stages"][name]["skipped"] is False
        assert report["stages"][name]["results"], name  # every stage produced results
        assert f"## {name}" in md
    assert (out / "stages" / "afm-paper" / "model" / "model.safetensors").is_file()
    assert (out / "stages" / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    pngs = list(out.glob("*.png"))
    assert pngs and all(f"]({p.name})" in md for p in pngs)
    assert "±" in md
    # upstream output hashes are recorded in the downstream stage's inputs
    students = json.loads((out / "stages" / "students" / "stage.json").read_text())
    afm = json.loads((out / "stages" / "afm-paper" / "stage.json").read_text())
    assert students["deps"]["afm-paper"] == afm["output_hash"]

    capsys.readouterr()
    assert rp.main(["--scale", "tiny", "--mini", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert all(again["stages"][n]["skipped"] is True for n in names)
    assert log.count("inputs unchanged, skipped") == len(names)
    assert again["stages"]["students"]["input_hash"] == report["stages"]["students"]["input_hash"]


def test_summary_overlays_every_model_of_the_curve_stages(tmp_path: Path) -> None:
    rp = _load()

    def row(model, x, mean, std, **params):  # noqa: ANN001, ANN202
        return {
            "model": model,
            "task": "toyworld_arith",
            "x": x,
            "mean": mean,
            "std": std,
            "params": params,
        }

    rob = tmp_path / "stages" / "robustness"
    rob.mkdir(parents=True)
    (rob / "stage.json").write_text("{}")
    for name, base in (("teacher", 0.9), ("afm", 0.95)):
        rows = [row(name, None, base, 0.0)]  # the fp row has no x: not a curve point
        rows += [row(name, float(s), base - 0.1 * s, 0.01) for s in (0, 3)]
        (rob / f"{name}.json").write_text(json.dumps({"rows": rows}))
    ttc = tmp_path / "stages" / "ttc"
    ttc.mkdir(parents=True)
    rows = [
        row("t [majority]", 1.0, 0.5, 0.0, method="majority", condition="fp"),
        row("t pcm [majority]", 1.0, 0.4, 0.1, method="majority", condition="pcm"),
        row("t pcm [majority]", 4.0, 0.6, 0.1, method="majority", condition="pcm"),
        row("t pcm [best-of-n]", 4.0, 0.9, 0.1, method="best-of-n", condition="pcm"),
    ]
    (ttc / "t.json").write_text(json.dumps({"rows": rows}))
    stages = [rp.Stage("robustness", []), rp.Stage("ttc", []), rp.Stage("lora", [])]
    md = "\n".join(rp._summary(tmp_path, stages, seeds=5))
    assert "| afm | 95.0 ± 1.0 | 65.0 ± 1.0 |" in md
    assert "| teacher | 90.0 ± 1.0 | 60.0 ± 1.0 |" in md
    assert "| t pcm [majority] | 40.0 ± 10.0 | 60.0 ± 10.0 |" in md
    assert "[best-of-n]" not in md and "| t [majority]" not in md  # noisy majority only
    assert (tmp_path / "summary-robustness.png").stat().st_size > 0
    assert (tmp_path / "summary-ttc.png").stat().st_size > 0
