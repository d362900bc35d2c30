"""Fixtures of the afm-train tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, toy_llama):
    """A tiny random Llama with its toy-world tokenizer, saved as a model directory."""
    model, tok = toy_llama(max_positions=64)
    d = tmp_path_factory.mktemp("model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)
