"""Fixtures of the afm-plan tests: a tiny random Llama with one layer made sensitive."""

from __future__ import annotations

import pytest
import torch
import transformers

SENSITIVE = "model.layers.0.mlp.down_proj"


def tiny_llama(tokenizer, *, layers: int = 1, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def make_sensitive(model: torch.nn.Module) -> torch.nn.Module:
    """``SENSITIVE`` made fragile: its output dominates the residual stream and one
    outlier column is every row's max |w|, so PCM noise (relative to that max) swamps
    the row's other weights; the other layers' noise barely moves the logits."""
    with torch.no_grad():
        layer = model.get_submodule(SENSITIVE)
        layer.weight.mul_(10.0)  # its output dominates the residual stream
        layer.weight[:, 0] = 3.0
        model.lm_head.weight.mul_(10.0)  # peaked next-token distributions
    return model


@pytest.fixture(scope="session")
def toy_tok(toy_llama):
    return toy_llama()[1]


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory):
    """24 short documents (one a line): quick forwards."""
    from afm.toyworld.world import narratives

    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    docs = [" ".join(t.split()[:12]) for t in narratives("test", 24, seed=1)]
    path.write_text("\n".join(docs) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sensitive_dir(tmp_path_factory, toy_tok):
    """A saved tiny Llama (1 block, 7 linear layers) whose ``SENSITIVE`` layer is fragile."""
    model = make_sensitive(tiny_llama(toy_tok))
    d = tmp_path_factory.mktemp("sensitive")
    model.save_pretrained(d)
    toy_tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def sensitive_layer():
    return SENSITIVE
