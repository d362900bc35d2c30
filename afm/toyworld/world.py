"""The toy world: a seeded, procedural corpus for afm's embedded tiny teacher.

Three kinds of documents (one document = one line of text):

Arithmetic (step-by-step, column by column from the right)::

    Q: 47+38=? A: 7+8=15, 4+3+1=8. Answer: 85
    Q: 83-47=? A: 13-7=6, 8-4-1=3. Answer: 36

Grammar (``a`` and ``b`` are non-negative integers, ``a >= b`` for ``-``)::

    arith   := "Q: " a op b "=? A: " step (", " step)* ". Answer: " result
    op      := "+" | "-"
    step    := add_step | sub_step
    add_step:= x "+" y ["+1"] "=" s          # x, y: digits of this column (0-padded),
                                             # "+1" when the previous column carried;
                                             # s = the column sum (may be 2 digits)
    sub_step:= ["1"] x "-" y ["-1"] "=" d    # "1" prefix when this column borrows,
                                             # "-1" when the previous column borrowed;
                                             # d = the column's result digit
    result  := the exact decimal result, no leading zeros

Facts about a fixed world of ``n_entities`` entities (default 48), each with
three attributes (home town, favourite colour, pet) drawn once from the world
seed::

    fact     := name " lives in " town "." | name " likes the color " color "."
              | name " keeps a " pet "."
    bio      := fact (" " fact){2}           # the three facts, shuffled
    question := "Q: " template(name, attribute) " A: " value
    templates (4 per attribute), e.g. "Where does Mira live?",
              "What is the favorite color of Mira?", "What pet does Mira keep?"

Narrative paragraphs (2–4 sentences from a small template grammar about a
separate pool of everyday names, places, animals and objects), e.g.
``Anna walked to the market in the morning. She saw a small cat near the gate.``

Splits.  Every arithmetic problem ``a op b``, every facts question
(entity, attribute, template) and every narrative paragraph is assigned to
exactly one of ``train`` / ``validation`` / ``test`` by a stable hash of its
canonical key, so the splits never share a problem or a question.  Facts
questions are split per fact: of the 4 templates, 2 are train, 1 validation,
1 test; the facts themselves (the world) are stated in the training corpus,
so the test is closed-book recall of memorised facts through an unseen
question wording.  Multiple-choice questions have 4 options: the true value
and 3 distractors of the same attribute.

The training mixture (:class:`ToyWorldConfig`): 72 % arithmetic (2- and 3-digit,
40 / 60 %), 20 % facts (40 % bios, 60 % training-split Q/A), 8 % narrative.

Accuracy on these problems is measured by :mod:`afm.toyworld.scoring`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ArithProblem",
    "FactQuestion",
    "World",
    "ToyWorldConfig",
    "make_world",
    "split_of",
    "arith_text",
    "sample_arith",
    "arith_problems",
    "fact_questions",
    "narrative_paragraph",
    "narratives",
    "training_documents",
    "tasks_dir",
    "SPLITS",
    "ATTRIBUTES",
    "WORLD_SEED",
    "ANSWER_RE",
]

SPLITS = ("train", "validation", "test")
ANSWER_RE = re.compile(r"Answer: (-?\d+)")
WORLD_SEED = 1234


def _hash01(key: str) -> float:
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def split_of(key: str, val_frac: float = 0.05, test_frac: float = 0.05) -> str:
    """The split a canonical key belongs to (stable across runs and machines)."""
    u = _hash01(key)
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "validation"
    return "train"


# --------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class ArithProblem:
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def key(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def n_digits(self) -> int:
        return len(str(max(self.a, self.b)))

    @property
    def prompt(self) -> str:
        """The prompt; ends with a space so that its tokenization matches training."""
        return f"Q: {self.a}{self.op}{self.b}=? A: "

    @property
    def solution(self) -> str:
        """The completion after :attr:`prompt` (steps and the answer line)."""
        return arith_text(self)[len(self.prompt) :]

    @property
    def split(self) -> str:
        return split_of("arith:" + self.key)


def _steps(a: int, b: int, op: str) -> list[str]:
    n = max(len(str(a)), len(str(b)))
    da = [int(c) for c in str(a).zfill(n)][::-1]
    db = [int(c) for c in str(b).zfill(n)][::-1]
    steps, carry = [], 0
    for x, y in zip(da, db, strict=True):
        if op == "+":
            s = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
            carry = s // 10
        else:
            borrow_in = carry
            borrow_out = 1 if x - borrow_in < y else 0
            top = x + 10 * borrow_out
            d = top - y - borrow_in
            steps.append(f"{top}-{y}{'-1' if borrow_in else ''}={d}")
            carry = borrow_out
    return steps


def arith_text(p: ArithProblem) -> str:
    """The full training document for a problem."""
    if p.op == "-" and p.a < p.b:
        raise ValueError(f"subtraction needs a >= b, got {p.a}-{p.b}")
    return f"{p.prompt}{', '.join(_steps(p.a, p.b, p.op))}. Answer: {p.answer}"


def sample_arith(rng: random.Random, n_digits: int, op: str) -> ArithProblem:
    lo, hi = 10 ** (n_digits - 1), 10**n_digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-" and a < b:
        a, b = b, a
    return ArithProblem(a, b, op)


def arith_problems(
    split: str,
    n: int,
    seed: int = 0,
    digits: Sequence[int] = (2, 3),
    ops: Sequence[str] = ("+", "-"),
) -> list[ArithProblem]:
    """``n`` distinct problems of one split, evenly over (digits, op), deterministic."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"arith-{split}-{seed}")
    kinds = [(d, o) for d in digits for o in ops]
    out: list[ArithProblem] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        d, o = kinds[i % len(kinds)]
        for _ in range(10_000):
            p = sample_arith(rng, d, o)
            if p.split == split and p.key not in seen:
                break
        else:  # pragma: no cover - only for tiny digit ranges
            raise ValueError(f"cannot draw {n} distinct {split} problems with {d} digits")
        seen.add(p.key)
        out.append(p)
        i += 1
    return out


# --------------------------------------------------------------------------- the world

_SYL = ["ka", "lo", "mi", "ra", "te", "vu", "no", "si", "da", "fe", "gu", "ho", "pi", "zo", "be"]
_TOWNS = ["Arden", "Belmor", "Caston", "Dunmere", "Elwick", "Farrow", "Glenby", "Harlow"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
_PETS = ["cat", "dog", "fox", "owl", "horse", "goat", "rabbit", "parrot"]
ATTRIBUTES = ("home", "color", "pet")
_TEMPLATES = {
    "home": [
        "Where does {n} live?",
        "Which town is {n} from?",
        "What is the home town of {n}?",
        "In which town does {n} live?",
    ],
    "color": [
        "What color does {n} like?",
        "What is the favorite color of {n}?",
        "Which color does {n} like best?",
        "What color is the favorite of {n}?",
    ],
    "pet": [
        "What pet does {n} keep?",
        "Which animal does {n} own?",
        "What animal is the pet of {n}?",
        "What kind of pet does {n} have?",
    ],
}
_FACT = {
    "home": "{n} lives in {v}.",
    "color": "{n} likes the color {v}.",
    "pet": "{n} keeps a {v}.",
}
_VALUES = {"home": _TOWNS, "color": _COLORS, "pet": _PETS}


@dataclass(frozen=True)
class World:
    """Entities (capitalised invented names) and their attribute values."""

    entities: tuple[str, ...]
    attributes: tuple[tuple[str, str, str], ...]  # (home, color, pet) per entity

    def value(self, entity: str, attribute: str) -> str:
        return self.attributes[self.entities.index(entity)][ATTRIBUTES.index(attribute)]

    def facts(self, entity: str) -> list[str]:
        return [_FACT[a].format(n=entity, v=self.value(entity, a)) for a in ATTRIBUTES]


def make_world(n_entities: int = 48, seed: int = WORLD_SEED) -> World:
    """The fixed world: ``n_entities`` distinct names with 3 attributes each."""
    rng = random.Random(f"world-{seed}")
    names: list[str] = []
    while len(names) < n_entities:
        name = "".join(rng.choice(_SYL) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in names:
            names.append(name)
    attrs = tuple(tuple(rng.choice(_VALUES[a]) for a in ATTRIBUTES) for _ in names)
    return World(tuple(names), attrs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FactQuestion:
    entity: str
    attribute: str
    template: int
    question: str  # "Where does Mira live?"
    choices: tuple[str, ...]  # 4 values, the gold one included
    gold: int

    @property
    def key(self) -> str:
        return f"{self.entity}|{self.attribute}|{self.template}"

    @property
    def prompt(self) -> str:
        return f"Q: {self.question} A:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.choices[self.gold]}"


def _template_split(entity: str, attribute: str, template: int) -> str:
    # per fact: a hash-chosen permutation of the 4 templates -> train, train, val, test
    order = sorted(range(4), key=lambda t: _hash01(f"tmpl:{entity}|{attribute}|{t}"))
    return ("train", "train", "validation", "test")[order.index(template)]


def fact_questions(split: str, world: World | None = None) -> list[FactQuestion]:
    """All multiple-choice questions of one split (deterministic order and choices)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    world = world or make_world()
    out = []
    for e in world.entities:
        for a in ATTRIBUTES:
            for t, tmpl in enumerate(_TEMPLATES[a]):
                if _template_split(e, a, t) != split:
                    continue
                rng = random.Random(f"choices:{e}|{a}|{t}")
                gold_v = world.value(e, a)
                others = rng.sample([v for v in _VALUES[a] if v != gold_v], 3)
                choices = others + [gold_v]
                rng.shuffle(choices)
                out.append(
                    FactQuestion(e, a, t, tmpl.format(n=e), tuple(choices), choices.index(gold_v))
                )
    return out


# --------------------------------------------------------------------------- narrative

_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack"]
_PLACES = ["market", "river", "school", "garden", "forest", "harbor", "library", "bakery"]
_TIMES = ["morning", "afternoon", "evening", "night"]
_ADJS = ["small", "old", "happy", "quiet", "big", "tired", "bright", "lazy"]
_ANIMALS = ["cat", "dog", "bird", "duck", "sheep", "mouse", "frog", "hen"]
_THINGS = ["gate", "bridge", "tree", "wall", "door", "well", "fence", "bench"]
_ITEMS = ["apples", "bread", "a book", "flowers", "a letter", "some tea", "a map", "a hat"]
_SENTENCES = [
    "{N} walked to the {place} in the {time}.",
    "{P} saw a {adj} {animal} near the {thing}.",
    "{P} bought {item} at the {place}.",
    "The {animal} was {adj} and sat by the {thing}.",
    "Later {P2} went home with {item}.",
    "{N} met a friend at the {place}.",
    "It was a {adj} {time} by the {thing}.",
    "{P} gave {item} to the {adj} {animal}.",
]


def narrative_paragraph(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    pron = "She" if name in ("Anna", "Clara", "Emma", "Grace", "Ivy") else "He"
    first = _SENTENCES[0] if rng.random() < 0.5 else _SENTENCES[5]
    sents = [first] + rng.sample(_SENTENCES[1:5] + _SENTENCES[6:], rng.randint(1, 3))
    out = []
    for s in sents:
        out.append(
            s.format(
                N=name,
                P=pron,
                P2=pron.lower(),
                place=rng.choice(_PLACES),
                time=rng.choice(_TIMES),
                adj=rng.choice(_ADJS),
                animal=rng.choice(_ANIMALS),
                thing=rng.choice(_THINGS),
                item=rng.choice(_ITEMS),
            )
        )
    return " ".join(out)


def narratives(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct narrative paragraphs of one split."""
    rng = random.Random(f"narrative-{split}-{seed}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        t = narrative_paragraph(rng)
        if t not in seen and split_of("narr:" + t) == split:
            seen.add(t)
            out.append(t)
    return out


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class ToyWorldConfig:
    """Mixture of the training corpus (weights need not sum to 1)."""

    seed: int = 0
    n_entities: int = 48
    w_arith: float = 0.72
    w_facts: float = 0.20
    w_narrative: float = 0.08
    digits: tuple[int, ...] = (2, 3)
    digit_weights: tuple[float, ...] = (0.4, 0.6)
    w_bio: float = 0.4  # share of facts documents that are bios (rest: Q/A)


def training_documents(cfg: ToyWorldConfig = ToyWorldConfig()) -> Iterator[str]:
    """An endless, deterministic stream of training-split documents."""
    rng = random.Random(f"corpus-{cfg.seed}")
    world = make_world(cfg.n_entities)
    train_q = fact_questions("train", world)
    kinds, weights = ["arith", "facts", "narr"], [cfg.w_arith, cfg.w_facts, cfg.w_narrative]
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "arith":
            d = rng.choices(cfg.digits, cfg.digit_weights)[0]
            while True:
                p = sample_arith(rng, d, rng.choice("+-"))
                if p.split == "train":
                    break
            yield arith_text(p)
        elif kind == "facts":
            if rng.random() < cfg.w_bio:
                e = rng.choice(world.entities)
                facts = world.facts(e)
                rng.shuffle(facts)
                yield " ".join(facts)
            else:
                yield rng.choice(train_q).text
        else:
            while True:
                t = narrative_paragraph(rng)
                if split_of("narr:" + t) == "train":
                    break
            yield t


def tasks_dir() -> Path:
    """Directory of the bundled lm-eval tasks (installed as ``afm.tasks``)."""
    from importlib.resources import files

    return Path(str(files("afm.tasks")))
