"""Toy-world tasks for AHWA-LoRA adapters (``afm-lora --task NAME``).

New tasks in the style of :mod:`afm.toyworld.world` that the tiny teacher has never
seen, plus the teacher's own arithmetic (to adapt to the hardware only):

``mul`` — a new operation: 2-digit × 1-digit multiplication, step by step from
the right, in the toy world's scratchpad format::

    Q: 47*8=? A: 7*8=56, 4*8+5=37. Answer: 376
    Q: 21*3=? A: 1*3=3, 2*3=6. Answer: 63

    mul     := "Q: " a "*" b "=? A: " step ", " step ". Answer: " a·b
    step    := x "*" b ["+" c] "=" p     # x: digit of a (units first), c: carry in,
                                         # p = x·b + c (may be 2 digits)

All 720 problems (a in 10..99, b in 2..9) are split by a stable hash of ``a*b``
(70 % train, 10 % validation, 20 % test); accuracy is exact match of the
``Answer:`` with :func:`afm.toyworld.scoring.evaluate_arith` (greedy, batched).

``facts-new`` — a new set of facts: 24 entities of a second world (seed 4321,
names disjoint from the teacher's world), same attributes and question
templates as the toy world.  Training examples are the bios (the three facts)
and the two train-split question wordings per fact; the test is the toy
world's closed-book multiple choice on the held-out test wording
(:func:`afm.toyworld.scoring.evaluate_facts`).

``arith`` — the teacher's own step-by-step addition/subtraction (2–3 digits),
train split for training, test split for evaluation: an adapter that only
adapts the model to the hardware.

Every example is a ``(prompt, completion)`` pair; the completion is the part the
LM loss is computed on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from afm.toyworld.scoring import evaluate_arith, evaluate_facts
from afm.toyworld.world import SPLITS, World, arith_problems, fact_questions, make_world, split_of

__all__ = [
    "MulProblem",
    "LoraTask",
    "TASKS",
    "get_task",
    "mul_problems",
    "mul_text",
    "new_world",
]

MUL_SPLIT = {"val_frac": 0.10, "test_frac": 0.20}
NEW_WORLD_SEED = 4321
NEW_WORLD_SIZE = 24


# --------------------------------------------------------------------------- multiplication


@dataclass(frozen=True)
class MulProblem:
    """``a * b`` with a 2-digit ``a`` and a 1-digit ``b`` (duck-types ``ArithProblem``)."""

    a: int
    b: int
    op: str = "*"

    @property
    def key(self) -> str:
        return f"{self.a}*{self.b}"

    @property
    def answer(self) -> int:
        return self.a * self.b

    @property
    def prompt(self) -> str:
        return f"Q: {self.a}*{self.b}=? A: "

    @property
    def solution(self) -> str:
        return mul_text(self)[len(self.prompt) :]

    @property
    def completion(self) -> str:
        return self.solution

    @property
    def split(self) -> str:
        return split_of("mul:" + self.key, **MUL_SPLIT)


def _mul_steps(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    for x in (int(c) for c in reversed(str(a))):
        p = x * b + carry
        steps.append(f"{x}*{b}{f'+{carry}' if carry else ''}={p}")
        carry = p // 10
    return steps


def mul_text(p: MulProblem) -> str:
    """The full document of a multiplication problem."""
    if not (0 <= p.a and 0 <= p.b <= 9):
        raise ValueError(f"mul needs a >= 0 and a one-digit b, got {p.a}*{p.b}")
    return f"{p.prompt}{', '.join(_mul_steps(p.a, p.b))}. Answer: {p.answer}"


def mul_problems(split: str, n: int | None = None, seed: int = 0) -> list[MulProblem]:
    """The problems of one split in a seeded order (the first ``n``, or all)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    probs = [MulProblem(a, b) for a in range(10, 100) for b in range(2, 10)]
    probs = [p for p in probs if p.split == split]
    random.Random(f"mul-{split}-{seed}").shuffle(probs)
    return probs if n is None else probs[:n]


# --------------------------------------------------------------------------- new facts


def new_world(n_entities: int = NEW_WORLD_SIZE, seed: int = NEW_WORLD_SEED) -> World:
    """A second world whose names do not occur in the teacher's world."""
    teacher = set(make_world().entities)
    big = make_world(n_entities + len(teacher), seed=seed)
    keep = [i for i, e in enumerate(big.entities) if e not in teacher][:n_entities]
    return World(tuple(big.entities[i] for i in keep), tuple(big.attributes[i] for i in keep))


def facts_train_examples(world: World | None = None, seed: int = 0) -> list[tuple[str, str]]:
    world = world or new_world()
    rng = random.Random(f"facts-new-{seed}")
    out: list[tuple[str, str]] = []
    for e in world.entities:
        facts = world.facts(e)
        for _ in range(2):
            rng.shuffle(facts)
            out.append(("", " ".join(facts)))
    for q in fact_questions("train", world):
        out.append((q.prompt, " " + q.choices[q.gold]))
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LoraTask:
    """A bundled task: training pairs, an accuracy metric, calibration texts."""

    name: str
    description: str
    train_examples: Callable[[int], list[tuple[str, str]]]
    """``seed -> [(prompt, completion)]``."""
    evaluate: Callable[[Any, Any, int | None], float]
    """``(model, tokenizer, n_or_None) -> accuracy`` on the test split."""
    metric: str = "accuracy"

    def calibration_texts(self, n: int = 128, seed: int = 0) -> list[str]:
        return [p + c for p, c in self.train_examples(seed)[:n]]


def _mul_train(seed: int) -> list[tuple[str, str]]:
    return [(p.prompt, p.solution) for p in mul_problems("train", seed=seed)]


def _mul_eval(model: Any, tokenizer: Any, n: int | None) -> float:
    return float(evaluate_arith(model, tokenizer, mul_problems("test", n)))


def _facts_eval(model: Any, tokenizer: Any, n: int | None) -> float:
    qs = fact_questions("test", new_world())
    return evaluate_facts(model, tokenizer, qs if n is None else qs[:n])


def _arith_train(seed: int) -> list[tuple[str, str]]:
    probs = arith_problems("train", 1200, seed=seed, digits=(2, 3))
    return [(p.prompt, p.solution) for p in probs]


def _arith_eval(model: Any, tokenizer: Any, n: int | None) -> float:
    probs = arith_problems("test", n or 120, seed=0, digits=(2, 3))
    return float(evaluate_arith(model, tokenizer, probs))


TASKS: dict[str, LoraTask] = {
    "mul": LoraTask(
        "mul",
        "new operation: 2-digit x 1-digit multiplication, step by step (exact match)",
        _mul_train,
        _mul_eval,
    ),
    "facts-new": LoraTask(
        "facts-new",
        f"new facts: {NEW_WORLD_SIZE} unseen entities, closed-book multiple choice on a "
        "held-out question wording",
        lambda seed: facts_train_examples(seed=seed),
        _facts_eval,
    ),
    "arith": LoraTask(
        "arith",
        "the teacher's own 2-3 digit addition/subtraction (hardware adaptation only)",
        _arith_train,
        _arith_eval,
    ),
}


def get_task(name: str) -> LoraTask:
    """A bundled task by name; a clear error lists the names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; bundled tasks: {', '.join(TASKS)}") from None


def examples_from_jsonl(lines: Sequence[str]) -> list[tuple[str, str]]:
    """``{"prompt": ..., "completion": ...}`` per line -> pairs (blank lines skipped)."""
    import json

    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((str(row["prompt"]), str(row["completion"])))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"line {i}: expected a JSON object with 'prompt' and 'completion' ({err})"
            ) from None
    if not out:
        raise ValueError("the dataset has no examples")
    return out
