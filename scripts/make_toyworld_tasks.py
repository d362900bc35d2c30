#!/usr/bin/env python
"""Regenerate the data of the bundled toy-world lm-eval tasks (deterministic).

    python scripts/make_toyworld_tasks.py            # writes eval/tasks/toyworld/*.jsonl
    python scripts/make_toyworld_tasks.py --check    # exit 1 if the files differ

All items come from the toy world's *test* split (``afm.toyworld``):

- ``arith.jsonl``: 50 problems per (2/3 digits) x (+/-), 200 in all;
- ``facts.jsonl``: every test-split multiple-choice question (144);
- ``ppl.jsonl``: 100 narrative paragraphs and 100 worked arithmetic problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from afm import toyworld as tw

OUT = Path(__file__).resolve().parents[1] / "eval" / "tasks" / "toyworld"


def build() -> dict[str, list[dict]]:
    arith = [
        {
            "prompt": p.prompt,
            "answer": str(p.answer),
            "solution": p.solution,
            "a": p.a,
            "b": p.b,
            "op": p.op,
            "n_digits": p.n_digits,
        }
        for d in (2, 3)
        for op in ("+", "-")
        for p in tw.arith_problems("test", 50, seed=0, digits=(d,), ops=(op,))
    ]
    facts = [
        {
            "prompt": q.prompt,
            "choices": list(q.choices),
            "texts": [f"{q.prompt} {c}" for c in q.choices],
            "gold": q.gold,
            "entity": q.entity,
            "attribute": q.attribute,
            "question": q.question,
        }
        for q in tw.fact_questions("test")
    ]
    ppl = [{"text": t, "kind": "narrative"} for t in tw.narratives("test", 100, seed=1)]
    ppl += [
        {"text": tw.arith_text(p), "kind": "arith"} for p in tw.arith_problems("test", 100, seed=1)
    ]
    return {"arith": arith, "facts": facts, "ppl": ppl}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name, rows in build().items():
        path, text = args.out / f"{name}.jsonl", render(rows)
        if args.check:
            same = path.exists() and path.read_text() == text
            bad += not same
            print(f"{path}: {'ok' if same else 'DIFFERS'}")
        else:
            path.write_text(text)
            print(f"wrote {path} ({len(rows)} rows)")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
