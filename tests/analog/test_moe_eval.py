"""afm-eval on an analog MoE checkpoint (issue 16): lm-eval under deployment noise with the
experts programmed, two seeds, the model restored between them."""

from __future__ import annotations

import json

import torch
import transformers

import afm
from afm.cli import evaluate as eval_cli
from afm.toyworld.tokenizer import train_tokenizer

CORPUS = [
    "Mira lives in Arden. Mira keeps a cat.",
    "The cat sat by the gate in the morning.",
    "Is the sky blue? yes. Is grass red? no.",
] * 20


def test_afm_eval_of_an_analog_moe_under_noise(tmp_path, capsys):
    tok = train_tokenizer(CORPUS, vocab_size=120)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            max_position_embeddings=128,
        )  # fmt: skip
    )
    with torch.no_grad():  # Qwen3-MoE initialises its router to zeros: route for real
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0.0, 0.5)
    afm.convert(model, afm.get_preset("afm-paper"))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    (tmp_path / "ppl.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in CORPUS[:3]) + "\n"
    )
    (tmp_path / "tiny_ppl.yaml").write_text(
        f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "ppl.jsonl"}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
    )
    args = [
        "--model", f"path={tmp_path / 'moe'},label=moe",
        "--tasks", str(tmp_path / "tiny_ppl.yaml"),
        "--noise", "pcm",
        "--seeds", "2",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert eval_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| moe | pcm |" in out
    reports = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    rows = [r for rep in reports for r in rep.get("rows", [])]
    by_condition = {r["condition"]: r for r in rows}
    assert {"fp", "pcm"} <= set(by_condition)
    pcm = by_condition["pcm"]
    assert pcm["seeds"] == [0, 1] and len(set(pcm["scores"])) == 2  # two different chips
    assert all(v == v and v < float("inf") for v in pcm["scores"])
    assert by_condition["fp"]["mean"] not in pcm["scores"]  # the noise reached the model
