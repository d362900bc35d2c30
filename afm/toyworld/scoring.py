"""Accuracy on the toy world's problems, fast enough for training loops and sweeps.

:func:`evaluate_arith` (batched greedy generation with KV cache and left padding,
parses ``Answer: <int>``) and :func:`evaluate_facts` (picks the choice with the
highest sequence log-likelihood).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afm.toyworld.world import ANSWER_RE, ArithProblem, FactQuestion

__all__ = ["evaluate_arith", "evaluate_facts", "parse_answer"]


def parse_answer(text: str) -> int | None:
    """The integer after the first ``Answer:`` in ``text`` (None if absent)."""
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def evaluate_arith(
    model: Any,
    tokenizer: Any,
    problems: Sequence[ArithProblem],
    batch_size: int = 64,
    return_outputs: bool = False,
) -> float | tuple[float, list[str]]:
    """Exact-match accuracy of greedy step-by-step answers (batched, KV cache)."""
    import torch

    if not problems:
        raise ValueError("no problems given")
    nl = tokenizer.convert_tokens_to_ids("Ċ")
    eos = [tokenizer.eos_token_id] + ([nl] if isinstance(nl, int) and nl >= 0 else [])
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, outputs = 0, []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(_device(model)) for k, v in enc.items() if k != "token_type_ids"}
            max_new = max(
                len(tokenizer(p.solution, add_special_tokens=False).input_ids) for p in chunk
            )
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new + 4,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for p, t in zip(chunk, texts, strict=True):
                t = t.split("\n")[0]
                outputs.append(t)
                correct += int(parse_answer(t) == p.answer)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    acc = correct / len(problems)
    return (acc, outputs) if return_outputs else acc


def evaluate_facts(
    model: Any, tokenizer: Any, questions: Sequence[FactQuestion], batch_size: int = 64
) -> float:
    """Multiple-choice accuracy: the choice whose full text has the highest log-likelihood."""
    import torch

    if not questions:
        raise ValueError("no questions given")
    texts = [f"{q.prompt} {c}" for q in questions for c in q.choices]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            ids = enc["input_ids"].to(_device(model))
            mask = enc["attention_mask"].to(_device(model))
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            scores += (logp * mask[:, 1:]).sum(-1).tolist()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    correct, k = 0, 0
    for q in questions:
        s = scores[k : k + len(q.choices)]
        k += len(q.choices)
        correct += int(max(range(len(s)), key=s.__getitem__) == q.gold)
    return correct / len(questions)
