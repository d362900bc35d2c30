"""The bundled lm-eval tasks run offline on the tiny teacher."""

from __future__ import annotations

import math
import os

import pytest

from afm import models
from afm import toyworld as tw

TINY = models.resolve_model("tiny")


def test_task_yamls_are_well_formed():
    yaml = pytest.importorskip("yaml")
    d = tw.tasks_dir()
    kinds = {}
    for name in ("toyworld_arith", "toyworld_facts", "toyworld_ppl"):
        text = (d / f"{name}.yaml").read_text().replace("!function ", "")
        cfg = yaml.safe_load(text)
        assert cfg["task"] == name
        kinds[name] = cfg["output_type"]
        assert cfg["custom_dataset"].startswith("toyworld_utils.")
    assert kinds == {
        "toyworld_arith": "generate_until",
        "toyworld_facts": "multiple_choice",
        "toyworld_ppl": "loglikelihood_rolling",
    }


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(TINY, "model.safetensors")),
    reason="bundled tiny teacher not built",
)
def test_tasks_run_offline_on_tiny(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": TINY, "dtype": "float32", "device": "cpu"},
        tasks=["toyworld_arith", "toyworld_facts", "toyworld_ppl"],
        task_manager=TaskManager(include_path=str(tw.tasks_dir())),
        limit=12,
        batch_size=12,
        log_samples=True,
    )
    res = out["results"]
    assert res["toyworld_arith"]["exact_match,answer"] >= 0.75
    assert res["toyworld_facts"]["acc,none"] >= 0.75
    bpb = res["toyworld_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and 0 < bpb < 1.0
    # the prompt reaches the model unchanged (trailing space kept, as in training)
    first = out["samples"]["toyworld_arith"][0]
    assert first["arguments"][0][0].endswith("=? A: ")
