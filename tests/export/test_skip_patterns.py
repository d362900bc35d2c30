"""Issue 15 §2: an export ``skip`` pattern that matches no layer is an error.

Before, ``afm-export --skip no_such_layer`` replaced the default skip list with a name
that matches nothing, and silently quantized the output head.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import afm

pytest.importorskip("compressed_tensors")

from afm.cli.export import main as cli_main  # noqa: E402
from afm.export import export_int4  # noqa: E402


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def test_library_skip_typo_is_an_error_and_writes_nothing(tmp_path):
    model = afm.convert(_model(), afm.get_preset("afm-paper"))
    with pytest.raises(ValueError, match=r"skip: 'lm_haed' \(closest: lm_head"):
        export_int4(model, tmp_path / "out", skip=("lm_haed",))
    assert not (tmp_path / "out").exists()


def test_cli_skip_no_such_layer_is_one_line_exit_2(tmp_path, capsys):
    _model().save_pretrained(tmp_path / "model")
    code = cli_main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "out"),
            "--skip",
            "no_such_layer",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "afm-export" in line]
    assert len(lines) == 1 and lines[0].startswith("afm-export: error: ")
    assert "'no_such_layer' matches no linear layer" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
