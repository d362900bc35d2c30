"""What "worse than the FP model" means: a task's accuracy, KL to FP, or perplexity.

Every metric scores the model as it is now (``score``) and turns a score into a *loss*,
how much worse than the FP model's score it is, in the metric's unit:

* :class:`TaskMetric` — an accuracy-like task metric in [0, 1] (the bundled toy-world
  tasks through the fast path, any lm-eval task through ``LmEvalRunner``);
  loss = points below FP (``100 · (fp - score)``).
* :class:`KLMetric` — mean per-token KL(FP ‖ model) on a text set; the FP
  distributions are computed once; loss = the KL itself (0 for FP).
* :class:`PerplexityMetric` — perplexity on a text set; loss = % above FP.

:func:`make_metrics` builds one metric for the selection data and one for held-out
data: disjoint halves of the documents (even / odd indices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from afm.evaluate.loading import read_texts
from afm.evaluate.runners import LmEvalRunner, ToyRunner
from afm.evaluate.specs import TaskSpec, bundled_tasks_dir
from afm.plan.inputs import PlanInputError

__all__ = [
    "KLMetric",
    "Metric",
    "PerplexityMetric",
    "TaskMetric",
    "TEXT_METRICS",
    "make_metrics",
    "plan_texts",
]

TEXT_METRICS = ("kl", "ppl")
SELECTION, HELD_OUT = (0, 2), (1, 2)


class Metric(Protocol):
    name: str
    unit: str

    def score(self, model: nn.Module) -> float:
        """The model's score as it is now."""
        ...

    def loss(self, score: float, fp_score: float) -> float:
        """How much worse than FP ``score`` is (0: as good; in ``unit``)."""
        ...


@dataclass
class TaskMetric:
    """An accuracy-like metric of one task (``runner.run`` gives ``{task: (metric, v)}``)."""

    runner: Any
    task: str
    tokenizer: Any
    unit: str = "points"

    @property
    def name(self) -> str:
        return self.task

    def score(self, model: nn.Module) -> float:
        results = self.runner.run(model, self.tokenizer)
        if self.task not in results:
            raise PlanInputError(f"task {self.task!r} gave no result (got {sorted(results)})")
        metric, value = results[self.task]
        if not 0.0 <= value <= 1.0:
            raise PlanInputError(
                f"task {self.task!r}: metric {metric} = {value} is not an accuracy in [0, 1]; "
                f"budgets in points need one (use a text set with --metric kl or ppl)"
            )
        return float(value)

    def loss(self, score: float, fp_score: float) -> float:
        return 100.0 * (fp_score - score)


class _TextBatches:
    """Texts tokenized once into right-padded batches."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int):
        if not texts:
            raise PlanInputError("the text set is empty")
        self.batches = []
        old = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    list(texts[i : i + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                self.batches.append((enc["input_ids"], enc["attention_mask"]))
        finally:
            tokenizer.padding_side = old

    def log_probs(self, model: nn.Module) -> list[torch.Tensor]:
        device = next(model.parameters()).device
        out = []
        with torch.no_grad():
            for ids, mask in self.batches:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out.append(torch.log_softmax(logits.float(), -1).cpu())
        return out


class KLMetric:
    """Mean per-token KL(FP ‖ model) over the real (unpadded) positions of a text set."""

    unit = "nats/token"
    name = "kl"

    def __init__(self, texts: Sequence[str], tokenizer: Any, fp_model: nn.Module, **kw: int):
        self.data = _TextBatches(
            texts, tokenizer, kw.get("batch_size", 8), kw.get("max_length", 256)
        )
        self.reference = self.data.log_probs(fp_model.eval())

    def score(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for (_, mask), ref, logq in zip(
            self.data.batches, self.reference, self.data.log_probs(model), strict=True
        ):
            kl = (ref.exp() * (ref - logq)).sum(-1)
            total += float((kl * mask).sum())
            count += int(mask.sum())
        return total / count

    def loss(self, score: float, fp_score: float) -> float:
        return score - fp_score


class PerplexityMetric:
    """Perplexity of the next tokens of a text set (loss: % above the FP perplexity)."""

    unit = "% ppl"
    name = "ppl"

    def __init__(self, texts: Sequence[str], tokenizer: Any, **kw: int):
        self.data = _TextBatches(
            texts, tokenizer, kw.get("batch_size", 8), kw.get("max_length", 256)
        )

    def score(self, model: nn.Module) -> float:
        nll, count = 0.0, 0
        for (ids, mask), logp in zip(self.data.batches, self.data.log_probs(model), strict=True):
            target_mask = mask[:, 1:].float()
            picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            nll -= float((picked * target_mask).sum())
            count += int(target_mask.sum())
        return math.exp(nll / count)

    def loss(self, score: float, fp_score: float) -> float:
        return 100.0 * (score / fp_score - 1.0)


def plan_texts(source: str) -> list[str]:
    """A text set: ``toyworld`` (the bundled held-out toy-world documents, ppl.jsonl) or a
    file (one document a line, or JSON lines with ``"text"``)."""
    path = bundled_tasks_dir() / "toyworld" / "ppl.jsonl" if source == "toyworld" else source
    try:
        return read_texts(path, what="text set")
    except ValueError as err:
        raise PlanInputError(str(err)) from None


def make_metrics(
    *,
    tokenizer: Any,
    fp_model: nn.Module,
    task: str | None = None,
    texts: str | None = None,
    metric: str = "kl",
    limit: int | None = None,
    batch_size: int = 16,
) -> tuple[Metric, Metric]:
    """``(selection metric, held-out metric)`` on disjoint halves of the data: a task
    (``task``) or a text set (``texts`` with ``metric`` kl or ppl); ``limit`` documents
    per half at most."""
    if (task is None) == (texts is None):
        raise PlanInputError("give a task (--task) or a text set (--texts), not both or none")
    if task is not None:
        name = task if task in ToyRunner.TASKS else TaskSpec.parse(task).task
        return tuple(  # type: ignore[return-value]
            TaskMetric(_runner(task, split, limit, batch_size), name, tokenizer)
            for split in (SELECTION, HELD_OUT)
        )
    if metric not in TEXT_METRICS:
        raise PlanInputError(f"metric={metric!r} is invalid: a text set takes {TEXT_METRICS}")
    docs = plan_texts(str(texts))
    halves = [docs[0::2][:limit], docs[1::2][:limit]]
    if metric == "kl":
        return tuple(KLMetric(h, tokenizer, fp_model) for h in halves)  # type: ignore[return-value]
    return tuple(PerplexityMetric(h, tokenizer) for h in halves)  # type: ignore[return-value]


def _runner(task: str, split: tuple[int, int], limit: int | None, batch_size: int) -> Any:
    if task in ToyRunner.TASKS:
        return ToyRunner([task], limit=limit, split=split, spread=True)
    return LmEvalRunner(
        [TaskSpec.parse(task)], limit=limit, spread=True, split=split, batch_size=batch_size
    )
