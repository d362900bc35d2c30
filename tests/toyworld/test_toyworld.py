"""Tests for the toy-world generator, its splits, tokenizer and task data."""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import pytest

from afm import toyworld as tw

ROOT = Path(__file__).resolve().parents[2]


def test_examples_from_the_notes():
    assert tw.arith_text(tw.ArithProblem(47, 38, "+")) == (
        "Q: 47+38=? A: 7+8=15, 4+3+1=8. Answer: 85"
    )
    assert tw.arith_text(tw.ArithProblem(83, 47, "-")) == (
        "Q: 83-47=? A: 13-7=6, 8-4-1=3. Answer: 36"
    )
    # borrow through a zero, and a shorter second operand padded with 0
    assert tw.arith_text(tw.ArithProblem(1000, 1, "-")) == (
        "Q: 1000-1=? A: 10-1=9, 10-0-1=9, 10-0-1=9, 1-0-1=0. Answer: 999"
    )


def _check_steps(p: tw.ArithProblem) -> None:
    """Re-derive the answer from the written steps (digit by digit, right to left)."""
    body = tw.arith_text(p)[len(p.prompt) :]
    steps, answer = body.split(". Answer: ")
    digits = []
    for s in steps.split(", "):
        lhs, rhs = s.split("=")
        assert eval(lhs) == int(rhs), s  # noqa: S307 - digits and +/- only
        digits.append(int(rhs) % 10)
    value = sum(d * 10**i for i, d in enumerate(digits))
    if p.op == "+":
        value += (int(steps.split(", ")[-1].split("=")[1]) // 10) * 10 ** len(digits)
    assert value == p.answer == int(answer)


@pytest.mark.parametrize("seed", range(3))
def test_steps_are_correct(seed):
    rng = random.Random(seed)
    for _ in range(300):
        d, op = rng.choice((1, 2, 3, 4, 5)), rng.choice("+-")
        p = tw.sample_arith(rng, d, op)
        _check_steps(p)
        assert tw.parse_answer(tw.arith_text(p)) == p.answer


def test_subtraction_needs_a_ge_b():
    with pytest.raises(ValueError, match="a >= b"):
        tw.arith_text(tw.ArithProblem(3, 5, "-"))


def test_generator_is_deterministic():
    cfg = tw.ToyWorldConfig(seed=7)
    a = list(itertools.islice(tw.training_documents(cfg), 300))
    b = list(itertools.islice(tw.training_documents(cfg), 300))
    c = list(itertools.islice(tw.training_documents(tw.ToyWorldConfig(seed=8)), 300))
    assert a == b
    assert a != c
    assert tw.make_world() == tw.make_world()
    assert tw.arith_problems("test", 20) == tw.arith_problems("test", 20)
    assert tw.fact_questions("test") == tw.fact_questions("test")
    # the mixture contains all three kinds of documents
    assert any(d.startswith("Q: ") and "Answer:" in d for d in a)
    assert any(" lives in " in d for d in a)
    assert any(" walked to the " in d or " met a friend " in d for d in a)


def test_arith_splits_disjoint():
    keys = {s: {p.key for p in tw.arith_problems(s, 200)} for s in tw.SPLITS}
    for s1, s2 in itertools.combinations(tw.SPLITS, 2):
        assert not keys[s1] & keys[s2]
    # the training stream never contains a held-out problem
    held = {p.key for s in ("validation", "test") for p in tw.arith_problems(s, 300)}
    docs = itertools.islice(tw.training_documents(), 3000)
    seen = {d.split("=?")[0][3:] for d in docs if d.startswith("Q: ") and "=?" in d}
    assert len(seen) > 1000
    assert not seen & held


def test_fact_question_splits():
    world = tw.make_world()
    qs = {s: tw.fact_questions(s, world) for s in tw.SPLITS}
    texts = {s: {q.question for q in qs[s]} for s in tw.SPLITS}
    for s1, s2 in itertools.combinations(tw.SPLITS, 2):
        assert not texts[s1] & texts[s2]
    n_facts = len(world.entities) * len(tw.ATTRIBUTES)
    assert len(qs["test"]) == len(qs["validation"]) == n_facts
    assert len(qs["train"]) == 2 * n_facts
    for q in qs["test"]:
        assert len(q.choices) == 4 == len(set(q.choices))
        assert q.choices[q.gold] == world.value(q.entity, q.attribute)
    # held-out questions never appear in the training stream; their facts do
    docs = set(itertools.islice(tw.training_documents(), 5000))
    assert not {q.text for q in qs["test"]} & docs
    facts = {f for d in docs for f in d.split(". ")}
    assert any(world.facts(world.entities[0])[0].rstrip(".") in f for f in facts)


def test_narrative_splits_disjoint():
    n = {s: set(tw.narratives(s, 50)) for s in tw.SPLITS}
    for s1, s2 in itertools.combinations(tw.SPLITS, 2):
        assert not n[s1] & n[s2]


def test_tokenizer_round_trip():
    from afm.toyworld.tokenizer import train_tokenizer

    docs = list(itertools.islice(tw.training_documents(), 3000))
    tok = train_tokenizer(docs, vocab_size=400)
    assert len(tok) == 400
    for d in docs[:200] + ["Q: 9999-1=? A: ", "Hello, world!\nÄ ☃ 0123456789"]:
        ids = tok(d).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == d
    pieces = tok.convert_ids_to_tokens(tok("a1234567890b", add_special_tokens=False).input_ids)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567890")
    assert (
        tok("x\ny", add_special_tokens=False).input_ids.count(tok.convert_tokens_to_ids("Ċ")) == 1
    )
    assert {tok.pad_token, tok.eos_token, tok.bos_token} == {"<|pad|>", "<|eos|>", "<|bos|>"}


def test_tasks_dir_and_data_in_sync():
    d = tw.tasks_dir()
    for name in ("toyworld_arith", "toyworld_facts", "toyworld_ppl"):
        assert (d / f"{name}.yaml").is_file()
    spec = importlib.util.spec_from_file_location(
        "make_toyworld_tasks", ROOT / "scripts" / "make_toyworld_tasks.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, rows in mod.build().items():
        assert (d / "toyworld" / f"{name}.jsonl").read_text() == mod.render(rows), name
    # task items come from the test split only
    for row in mod.build()["arith"]:
        assert tw.split_of(f"arith:{row['a']}{row['op']}{row['b']}") == "test"


def test_evaluate_helpers_on_random_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from afm.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(itertools.islice(tw.training_documents(), 1000), vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
        )
    )
    probs = tw.arith_problems("validation", 6)
    acc, outs = tw.evaluate_arith(model, tok, probs, batch_size=4, return_outputs=True)
    assert acc == 0.0 and len(outs) == 6
    qs = tw.fact_questions("validation")[:10]
    acc_f = tw.evaluate_facts(model, tok, qs, batch_size=16)
    assert 0.0 <= acc_f <= 1.0
    assert tok.padding_side == "left"  # restored
