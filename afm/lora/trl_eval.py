"""Evaluation for afm's TRL modes, in afm-eval's terms: every adapter state of one
``PeftModel`` on the same programmed chips (afm-eval's conditions and chip loop), the
result an afm-eval report; the training curves as a report too; the mean reward of
greedy completions for user RL data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from afm.evaluate.conditions import Condition
from afm.evaluate.loop import programmed
from afm.evaluate.report import EvalReport, ResultRow
from afm.lora.rewards import CheckedReward, call_reward

if TYPE_CHECKING:  # trl_common imports TRL; the supervised mode does not need it
    from afm.lora.trl_common import TrlResult

__all__ = ["chat_template_text", "evaluate_states", "mean_reward", "write_curves"]


def chat_template_text(path: str | Path) -> str:
    """A Jinja chat template file's text (``--chat-template``)."""
    text = Path(path).read_text()
    if "{%" not in text and "{{" not in text:
        raise ValueError(f"--chat-template {path}: not a Jinja template (no {{% or {{{{)")
    return text


@contextlib.contextmanager
def adapter_state(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """``adapter`` active (None: every adapter disabled, the base alone); restored after."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


@torch.no_grad()
def evaluate_states(
    model: nn.Module,
    states: Sequence[tuple[str, str | None]],
    conditions: Sequence[Condition],
    evaluate: Callable[[nn.Module], float],
    *,
    task: str,
    metric: str,
    progress: bool = True,
) -> EvalReport:
    """``evaluate`` for every ``(label, adapter)`` state × condition × seed; each chip is
    programmed once (analog layers only, adapters stay digital) and every state is
    scored on it, so the models are compared on the same chips."""
    from tqdm.auto import tqdm

    rows: dict[tuple[str, str], ResultRow] = {}
    total = sum(len(c.seeds) for c in conditions) * len(states)
    bar = tqdm(total=total, desc="conditions × seeds × adapters", disable=not progress)
    for cond in conditions:
        for seed in programmed(model, cond.noise, cond.seeds, only_analog=True):
            for label, adapter in states:
                with adapter_state(model, adapter):
                    score = float(evaluate(model))
                key = (label, cond.label)
                if key not in rows:
                    rows[key] = ResultRow(
                        label,
                        task,
                        metric,
                        cond.label,
                        [],
                        [],
                        cond.x,
                        cond.x_name,
                        dict(cond.params),
                    )
                rows[key].scores.append(score)
                rows[key].seeds.append(seed if cond.noise else None)
                bar.update(1)
    bar.close()
    return EvalReport(list(rows.values()), {"task": task}, f"{task}: base vs adapters")


def is_percent(metric: str) -> bool:
    return "NLL" not in metric


def write_curves(
    result: TrlResult,
    out_dir: str | Path,
    stem: str,
    metric: str,
    task: str,
    conditions: Sequence[Condition],
) -> dict[str, Path] | None:
    """``<stem>.md|json|png``: the evaluation curve (scores per chip at each point) and,
    for GRPO, the mean training reward of the steps since the previous point."""
    if not result.curve:
        return None
    cond = conditions[-1]
    rows = []
    label = f"{metric} under {cond.label} ({len(result.curve[0]['values'])} chips)"
    for point in result.curve:
        rows.append(_point_row(label, task, metric, point["step"], point["values"]))
    rewards = result.series("reward")
    prev = 0
    for point in result.curve[1:]:
        step = point["step"]
        window = [r for s, r in rewards if prev < s <= step]
        prev = step
        if window:
            rows.append(_point_row("train reward (noisy rollouts)", task, metric, step, window))
    report = EvalReport(
        rows, {"mode": result.mode, "seconds": result.seconds}, f"{task}: {result.mode} curves"
    )
    report.layout = "conditions"
    return report.write(out_dir, stem, percent=is_percent(metric))


def _point_row(label: str, task: str, metric: str, step: int, values: list) -> ResultRow:
    return ResultRow(label, task, metric, f"step {step}", list(values), [], step, "step")


def _prompt_text(prompt: Any, tokenizer: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def mean_reward(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    rewards: Sequence[CheckedReward],
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """Mean over ``rows`` of the summed rewards of the greedy completion (eval mode)."""
    if not rows:
        raise ValueError("no held-out rows to compute the reward on")
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    totals: list[float] = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = list(rows[i : i + batch_size])
            chat = not isinstance(chunk[0]["prompt"], str)
            prompts = [_prompt_text(r["prompt"], tokenizer) for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            enc.pop("token_type_ids", None)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            comps = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
            per_fn = [call_reward(fn, chunk, comps) for fn in rewards]
            for j in range(len(chunk)):
                totals.append(sum(v[j] for v in per_fn if v[j] is not None))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return sum(totals) / len(totals)
