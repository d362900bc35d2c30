"""afm-lora's --output: new or empty, or (--overwrite) a previous afm-lora adapter of the
same mode whose files are all replaced; anything else is refused before training."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from afm.lora.experiment import LoraExperiment, prepare_output  # noqa: E402
from afm.lora.trl_experiment import TrlExperiment  # noqa: E402

ADAPTER = ("adapter_model.safetensors", "adapter_config.json", "afm_lora.json")
TRL_REPORTS = ("sft-eval.md", "sft-eval.json", "sft-curves.json")


def _fill(d, names):
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).write_text("old")
    return d


def test_overwrite_replaces_every_file_of_the_old_adapter(tmp_path):
    out = _fill(tmp_path / "out", ADAPTER)
    with pytest.raises(ValueError, match="not empty"):
        LoraExperiment("tiny", "mul", str(out)).check()
    exp = LoraExperiment("tiny", "mul", str(out), overwrite=True)
    exp.check()
    assert prepare_output(exp) == out
    assert list(out.iterdir()) == []  # nothing of the old adapter stays


def test_overwrite_never_touches_other_files(tmp_path):
    out = _fill(tmp_path / "out", (*ADAPTER, "notes.txt"))
    exp = LoraExperiment("tiny", "mul", str(out), overwrite=True)
    with pytest.raises(ValueError, match="'notes.txt'"):
        exp.check()
    with pytest.raises(ValueError, match="not an afm-lora adapter"):
        prepare_output(exp)  # checked again before saving
    assert (out / "notes.txt").read_text() == "old"


def test_trl_modes_may_replace_their_own_reports(tmp_path):
    out = _fill(tmp_path / "out", (*ADAPTER, *TRL_REPORTS))
    with pytest.raises(ValueError, match="not empty"):
        TrlExperiment("tiny", "arith", str(out), mode="sft").check()
    exp = TrlExperiment("tiny", "arith", str(out), mode="sft", overwrite=True)
    exp.check()
    prepare_output(exp)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="'sft-curves.json'"):  # supervised: not its files
        LoraExperiment("tiny", "mul", str(_fill(out, TRL_REPORTS)), overwrite=True).check()


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--output"):
        TrlExperiment("tiny", "arith", str(tmp_path / "f"), mode="sft").check()
