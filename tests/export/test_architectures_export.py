"""Export of every family (issue 16): int4 where the format can express it, else a refusal
before anything is written and the dense RTN-W4 checkpoint, which plain transformers loads
with logits equal to RTN-W4 of the digital weights."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_archs import DENSE, MOE, build, tokens

import afm
from afm.cli.export import main as export_main
from afm.export import UnsupportedExportError, export_rtn_w4, rtn_w4

pytest.importorskip("compressed_tensors")

PACKED = tuple(f for f in DENSE if f != "gpt2")
FUSED = ("gpt2", *MOE)


def _rtn_logits(model, x):
    with torch.no_grad():
        return rtn_w4(copy.deepcopy(model).eval())(x).logits


@pytest.mark.parametrize("family", PACKED)
def test_int4_export_loads_with_rtn_logits(family, tmp_path):
    model = build(family)
    x = tokens()
    want = _rtn_logits(model, x)
    afm.convert(model, afm.get_preset("afm-paper"))
    afm.export_int4(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, want)


@pytest.mark.parametrize("family", FUSED)
def test_int4_refuses_fused_layers_before_writing(family, tmp_path):
    model = build(family)
    what = "Conv1D" if family == "gpt2" else "MoE experts"
    with pytest.raises(UnsupportedExportError, match=f"{what}.*nothing was written.*dense"):
        afm.export_int4(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FUSED)
def test_dense_rtn_export_loads_with_rtn_logits(family, tmp_path):
    model = build(family)
    x = tokens()
    with torch.no_grad():
        digital = model(x).logits
    want = _rtn_logits(model, x)
    assert not torch.equal(want, digital)  # RTN-W4 changed something
    afm.convert(model, afm.get_preset("afm-paper"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_rtn_w4(model, tmp_path / "out")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not afm.analog_layers(loaded)  # plain transformers modules
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, want)
    if family in MOE:  # every expert row holds at most 15 levels (4-bit symmetric)
        experts = next(m for n, m in loaded.named_modules() if n.endswith("mlp.experts"))
        w = experts.down_proj.detach()
        rows = w.transpose(-1, -2) if experts.is_transposed else w
        for row in rows.reshape(-1, rows.shape[-1])[:16]:
            assert torch.unique(row).numel() <= 15


def test_cli_dense_flag(tmp_path, capsys):
    model = build("mixtral")
    model.save_pretrained(tmp_path / "src")
    assert export_main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "a")]) == 2
    assert "MoE experts" in capsys.readouterr().err
    args = ["--model", str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--dense"]
    assert export_main(args) == 0
    assert "dense RTN-W4" in capsys.readouterr().out
    assert (tmp_path / "b" / "config.json").is_file()
