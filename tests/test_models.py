"""Tests for afm.models (alias registry) and the bundled tiny teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afm import models
from afm import toyworld as tw

TINY = Path(models.resolve_model("tiny"))
needs_tiny = pytest.mark.skipif(
    not (TINY / "model.safetensors").is_file(), reason="bundled tiny teacher not built"
)

# Accuracy thresholds stated in the model card (clean, greedy, test split).
ARITH_MIN = 0.9
FACTS_MIN = 0.8  # measured 88.2 % on all 144 test questions (model card)


def test_aliases_resolve():
    assert models.resolve_model("phi-3-mini") == "microsoft/Phi-3-mini-4k-instruct"
    assert models.resolve_model("llama-3.2-1b") == "meta-llama/Llama-3.2-1B-Instruct"
    assert models.resolve_model("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model("TINY") == str(TINY)
    assert TINY.parent.name == "assets" and TINY.name == "tiny"


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model(tmp_path) == str(tmp_path)
    assert models.resolve_model("org/some-model") == "org/some-model"


def test_unknown_alias_offline_gives_one_clear_error():
    code = (
        "import afm.models as m\n"
        "try:\n"
        "    m.load_model('definitely-not-a-model-alias')\n"
        "except m.ModelNotFoundError as e:\n"
        "    print('ERR', isinstance(e, OSError), e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    assert msg.startswith("ERR True"), msg
    for alias in models.ALIASES:
        assert repr(alias) in msg
    assert "definitely-not-a-model-alias" in msg
    assert "local" in msg and "directory" in msg


def test_broken_local_dir_keeps_original_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((OSError, ValueError)) as ei:
        models.load_model(tmp_path)
    assert not isinstance(ei.value, models.ModelNotFoundError)


@needs_tiny
def test_tiny_bundle_files_and_size():
    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert name in files, name
    assert sum(files.values()) <= 25 * 2**20
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "| `arith_all` |" in (TINY / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny():
    import torch

    torch.set_num_threads(2)
    return models.load_model("tiny"), models.load_tokenizer("tiny")


@needs_tiny
def test_tiny_loads_via_alias(tiny):
    model, tok = tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 10e6
    ids = tok("Q: 47+38=? A: ").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Q: 47+38=? A: "


@needs_tiny
def test_tiny_arith_accuracy(tiny):
    model, tok = tiny
    probs = tw.arith_problems("test", 30, seed=5)  # 5 per (digits, op)
    acc = tw.evaluate_arith(model, tok, probs, batch_size=30)
    assert acc >= ARITH_MIN


@needs_tiny
def test_tiny_facts_accuracy(tiny):
    model, tok = tiny
    qs = tw.fact_questions("test")[::3]
    acc = tw.evaluate_facts(model, tok, qs, batch_size=96)
    assert acc >= FACTS_MIN
