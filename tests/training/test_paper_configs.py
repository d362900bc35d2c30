"""The paper configs follow the AFM repository's recipe (issue 17, docs/training.md
"The paper recipe, line by line")."""

from __future__ import annotations

from pathlib import Path

import pytest

from afm.training.run_config import build_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.fixture(params=["phi3-mini-paper.yaml", "llama-3.2-1b-paper.yaml"])
def paper(request):
    return build_run_config(None, "/tmp/unused", config_file=str(CONFIGS / request.param))


def test_paper_configs_share_the_training_recipe(paper):
    t = paper.train
    assert (t.per_device_batch_size, t.grad_accum_steps) == (1, 1)  # ds_config.json
    assert t.mixed_precision == "fp16" and t.teacher_dtype == "float16"
    assert t.lr_end == 1e-7  # HF polynomial decay's default, kept by the AFM Trainer
    assert (t.lr, t.warmup_ratio, t.weight_decay, t.max_grad_norm) == (5e-7, 0.016, 0.01, 1.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps) == (0.9, 0.98, 1e-6)
    assert paper.preset == "afm-paper" and paper.head_is_analog()
    d = paper.data
    assert (d.seq_len, d.temperature, d.eos, d.top_p) == (4096, 1.0, "ignore", None)


def test_only_llama_samples_with_top_k_50():
    # curate_synthetic_dataset.py: top_k=50 for Llama, none for Phi-3
    llama = build_run_config(None, "/tmp/u", config_file=str(CONFIGS / "llama-3.2-1b-paper.yaml"))
    phi3 = build_run_config(None, "/tmp/u", config_file=str(CONFIGS / "phi3-mini-paper.yaml"))
    assert llama.data.top_k == 50 and phi3.data.top_k is None
