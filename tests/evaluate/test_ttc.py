"""Tests for afm.evaluate.ttc: majority vote / best-of-N math, sample reuse, sampling, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama_for

transformers = pytest.importorskip("transformers")

from afm.evaluate import (  # noqa: E402
    Condition,  # noqa: E402
    ttc,
    ttc_sampling,
)

CORPUS = ["Q: 12+34=? A: 2+4=6, 1+3=4. Answer: 46", "The cat sat by the gate."] * 30
TINY_DIR = Path(__file__).resolve().parents[2] / "afm" / "assets" / "tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from afm.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=140)
    model = tiny_llama_for(tok, max_positions=256, kv_heads=2).eval()
    path = tmp_path_factory.mktemp("tiny_ttc")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


# ---------------------------------------------------------------------------- math
def test_vote_accuracy_hand_cases():
    assert ttc.vote_accuracy([7, 7, 3], [True, True, False]) == 1.0
    assert ttc.vote_accuracy([3, 7, 3], [False, True, False]) == 0.0
    assert ttc.vote_accuracy([7, 3], [True, False]) == 0.5  # tie: expected accuracy
    assert ttc.vote_accuracy([7, 3, 5], [True, False, False]) == pytest.approx(1 / 3)
    assert ttc.vote_accuracy([None, None], [False, False]) == 0.0
    assert ttc.vote_accuracy([None, None, 7], [False, False, True]) == 1.0  # None ignored
    with pytest.raises(ValueError):
        ttc.vote_accuracy([1], [True, False])


def test_best_of_n_hand_cases():
    assert ttc.best_of_n_accuracy([0.1, 0.9, 0.5], [True, False, True]) == 0.0
    assert ttc.best_of_n_accuracy([0.1, 0.9, 0.5], [False, True, False]) == 1.0
    assert ttc.best_of_n_accuracy([1.0, 1.0, 0.0], [True, False, False]) == 0.5
    # a 0/1 verifier makes best-of-N = pass@N
    assert ttc.best_of_n_accuracy([0.0, 1.0], [False, True]) == 1.0


def test_curves_reuse_prefixes_hand_computed():
    # problem 1: samples 5 (wrong), 4 (right), 4, 4; problem 2: 9 (right), 8, 8, 8
    answers = [[5, 4, 4, 4], [9, 8, 8, 8]]
    correct = [[False, True, True, True], [True, False, False, False]]
    curve = ttc.vote_curve(answers, correct, [1, 2, 3, 4])
    # N=1: p1 wrong, p2 right -> 0.5; N=2: both ties -> (0.5 + 0.5)/2; N=3: p1 right, p2 wrong
    assert curve == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}
    answers = [[5, 4, 4, 4], [9, 9, 8, 8]]
    correct = [[False, True, True, True], [True, True, False, False]]
    curve = ttc.vote_curve(answers, correct, [1, 2, 3, 4])
    assert curve == {1: 0.5, 2: (0.5 + 1.0) / 2, 3: 1.0, 4: (1.0 + 0.5) / 2}
    scores = [[0.2, 0.1, 0.9, 0.0], [0.5, 0.6, 0.1, 0.7]]
    best = ttc.best_of_n_curve(scores, correct, [1, 2, 3, 4])
    assert best == {1: 0.5, 2: (0.0 + 1.0) / 2, 3: 1.0, 4: (1.0 + 0.0) / 2}


def test_random_subsets_estimate_expectation():
    # one problem, half the samples right: E[acc at N=1] = 0.5
    answers, correct = [[1, 2] * 8], [[True, False] * 8]
    prefix = ttc.vote_curve(answers, correct, [1, 16])
    assert prefix[1] == 1.0  # the first sample happens to be right
    many = ttc.vote_curve(answers, correct, [1, 16], n_subsets=400, seed=3)
    assert many[1] == pytest.approx(0.5, abs=0.08)
    assert many[16] == prefix[16] == 0.5  # N = M: one subset, a tie
    with pytest.raises(ValueError, match="larger"):
        ttc.vote_curve(answers, correct, [32])


def test_ns_validation():
    assert ttc.default_ns(64) == [1, 2, 4, 8, 16, 32, 64]
    assert ttc.default_ns(6) == [1, 2, 4, 6]
    assert ttc.default_ns(1) == [1]
    assert ttc.check_ns([4, 1, 4]) == [1, 4]
    for bad in ([0], [-1], [], [1.5], [True]):
        with pytest.raises(ValueError):
            ttc.check_ns(bad)
    with pytest.raises(ValueError):
        ttc.default_ns(0)


# ---------------------------------------------------------------------------- reuse
class FakeSource:
    name = "fake"
    stop = ("\n",)

    def problems(self):
        return [ttc_sampling.Problem("a", "Q: a", 1), ttc_sampling.Problem("b", "Q: b", 2)]

    def extract(self, problem, text):
        return int(text) if text.strip().lstrip("-").isdigit() else None

    def is_correct(self, problem, text):
        return self.extract(problem, text) == problem.target


def test_samples_drawn_once_at_max_n(monkeypatch):
    calls = []
    table = {"Q: a": ["3", "1", "1", "x", "1", "1", "2", "1"], "Q: b": ["2"] * 8}

    def fake_sample(model, tokenizer, prompts, n, **kw):
        calls.append((tuple(prompts), n))
        return [
            [ttc_sampling.Sample(t, -float(i), 1) for i, t in enumerate(table[p][:n])]
            for p in prompts
        ]

    monkeypatch.setattr(ttc, "sample_completions", fake_sample)
    model = torch.nn.Linear(2, 2)
    report = ttc.run_ttc(
        [("m", model, None)],
        FakeSource(),
        [1, 2, 4, 8],
        conditions=[Condition("fp"), Condition("pcm", ttc_noise(), (0, 1))],
        scorers=["verifier", "logprob"],
        progress=False,
    )
    assert calls == [(("Q: a", "Q: b"), 8)] * 3  # once per chip, at the maximum N
    maj = {int(r.x): r.mean for r in report.rows if r.model == "m [majority]"}
    # problem a: N=1 "3" wrong; N=2 tie 3/1 -> .5; N=4 "1" x2 -> right; b always right
    assert maj == {1: 0.5, 2: 0.75, 4: 1.0, 8: 1.0}
    lp = {int(r.x): r.mean for r in report.rows if r.model == "m [best-of-n[logprob]]"}
    assert lp == {1: 0.5, 2: 0.5, 4: 0.5, 8: 0.5}  # logprob prefers the first sample
    ver = {int(r.x): r.mean for r in report.rows if r.model == "m [best-of-n[verifier]]"}
    assert ver == {1: 0.5, 2: 1.0, 4: 1.0, 8: 1.0}
    noisy = [r for r in report.rows if r.model == "m pcm [majority]"]
    assert noisy and all(r.seeds == [0, 1] for r in noisy)


def ttc_noise():
    from afm.analog.noise import get_noise_model

    return get_noise_model("gaussian", std=0.01)


# ---------------------------------------------------------------------------- sampling
def test_sample_completions_shapes_seeds_and_stop(tiny):
    model, tok, _ = tiny
    prompts = ["Q: 12+34=? A: ", "The cat"]
    a = ttc_sampling.sample_completions(
        model, tok, prompts, 5, max_new_tokens=6, seed=1, batch_size=4, progress=False
    )
    assert [len(x) for x in a] == [5, 5]
    assert all("\n" not in s.text and s.n_tokens <= 6 for x in a for s in x)
    assert all(s.logprob <= 0 for x in a for s in x)
    b = ttc_sampling.sample_completions(
        model, tok, prompts, 5, max_new_tokens=6, seed=1, batch_size=4, progress=False
    )
    assert [[s.text for s in x] for x in a] == [[s.text for s in x] for x in b]
    c = ttc_sampling.sample_completions(
        model, tok, prompts, 5, max_new_tokens=6, seed=2, batch_size=4, progress=False
    )
    assert [[s.text for s in x] for x in a] != [[s.text for s in x] for x in c]
    with pytest.raises(ValueError, match="N must be > 0"):
        ttc_sampling.sample_completions(model, tok, prompts, 0)


def test_reward_model_scorer(tmp_path, tiny):
    _, tok, _ = tiny
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = ttc.RewardModelScorer(str(tmp_path))
    scores = scorer(["Q: 1+1=? A: ", "Q: 1+1=? A: "], ["Answer: 2", "Answer: 3"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert scores[0] != scores[1]
    src = FakeSource()
    samples = [[ttc_sampling.Sample("1", -1.0, 1), ttc_sampling.Sample("2", -2.0, 1)]] * 2
    out = ttc.score_samples(scorer, src, src.problems(), samples)
    assert [len(x) for x in out] == [2, 2]
    with pytest.raises(ValueError, match="unknown scorer"):
        ttc.score_samples("oracle", src, src.problems(), samples)


def test_lm_eval_source_verifier(tmp_path):
    pytest.importorskip("lm_eval")
    rows = [{"q": "What is 2+3?", "a": "5"}, {"q": "What is 4+4?", "a": "8"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "d.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "Answer: (-?\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""
    )
    src = ttc_sampling.LmEvalSource(str(tmp_path / "gen.yaml"))
    probs = src.problems()
    assert [p.prompt for p in probs] == ["Q: What is 2+3? A:", "Q: What is 4+4? A:"]
    assert src.stop == ("\n",)
    assert src.extract(probs[0], " so Answer: 5") == "5"
    assert src.is_correct(probs[0], " so Answer: 5")
    assert not src.is_correct(probs[0], " Answer: 6")
    assert src.extract(probs[1], " no idea") is None
    assert (
        ttc.vote_accuracy(
            [src.extract(probs[1], t) for t in [" Answer: 8", " Answer: 7", " Answer: 8"]],
            [src.is_correct(probs[1], t) for t in [" Answer: 8", " Answer: 7", " Answer: 8"]],
        )
        == 1.0
    )


def test_cli_ttc_toyworld(capsys, tiny, tmp_path):
    from afm.cli.evaluate import main

    _, _, path = tiny
    rc = main(
        [
            "--ttc",
            "--model",
            f"path={path},label=rand",
            "--tasks",
            "toyworld_arith",
            "--limit",
            "3",
            "--max-n",
            "4",
            "--max-new-tokens",
            "8",
            "--scorer",
            "verifier",
            "--scorer",
            "logprob",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "ttc.json").read_text())
    methods = {r["params"]["method"] for r in data["rows"]}
    assert methods == {"majority", "best-of-n[verifier]", "best-of-n[logprob]"}
    assert sorted({r["x"] for r in data["rows"]}) == [1.0, 2.0, 4.0]
    assert data["meta"]["n_problems"] == 3
    assert (tmp_path / "ttc.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote png" in capsys.readouterr().out


@pytest.mark.skipif(
    not (TINY_DIR / "config.json").is_file(), reason="the tiny teacher is not trained yet"
)
def test_tiny_teacher_toy_arith_source_is_solvable():
    from afm.evaluate import ModelSpec, load_model_spec

    model, tok = load_model_spec(ModelSpec("tiny"))
    src = ttc_sampling.ToyArithSource(limit=4)
    samples = ttc_sampling.sample_completions(
        model, tok, [p.prompt for p in src.problems()], 4, temperature=0.3, progress=False
    )
    curves = ttc.ttc_rows(src, src.problems(), samples, [1, 4])
    assert curves["best-of-n[verifier]"][4] >= curves["best-of-n[verifier]"][1]  # pass@N
    pairs = zip(src.problems(), samples, strict=True)
    answers = [src.extract(p, s.text) for p, ss in pairs for s in ss]
    assert sum(a is not None for a in answers) >= len(answers) // 2  # the format is learned
