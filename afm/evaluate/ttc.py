"""Test-time compute scaling: majority vote and best-of-N with sample reuse.

For generation tasks with checkable answers, :func:`sample_completions` draws the
maximum number of completions ``M = max(ns)`` per problem **once**; the accuracy at
every ``N <= M`` is computed from subsets of those samples (:func:`vote_curve`,
:func:`best_of_n_curve`).  With ``n_subsets=1`` the subset is the first ``N`` samples
(a prefix); with more, the curve averages over the prefix and ``n_subsets - 1`` random
``N``-subsets of the ``M`` samples (a lower-variance estimate of the same expectation).

Ties are scored by their expected accuracy under a uniformly random tie-break: if the
most frequent answer is shared by ``k`` answers of which ``c`` are correct, the problem
scores ``c / k`` (majority vote); likewise among samples sharing the best score
(best-of-N).  A problem whose samples have no parseable answer scores 0.

Sources of problems (:mod:`afm.evaluate.ttc_sampling`): :class:`ToyArithSource` (the
bundled ``toyworld_arith`` test problems, offline) and :class:`LmEvalSource` (any lm-eval
``generate_until`` task; its filters extract the answer and its ``process_results``
checks it).  Scorers for
best-of-N: ``"verifier"`` (the task's own check: an oracle, i.e. pass@N),
``"logprob"`` (mean token log-probability of the sample under the sampling model) or
``"rm:<path>"`` (any HF sequence-classification reward model).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from afm.evaluate.conditions import Condition
from afm.evaluate.loop import ChipRun, chip_runs
from afm.evaluate.report import EvalReport, ResultRow
from afm.evaluate.ttc_sampling import Problem, Sample, Source, sample_completions

__all__ = [
    "vote_accuracy",
    "best_of_n_accuracy",
    "vote_curve",
    "best_of_n_curve",
    "default_ns",
    "check_ns",
    "RewardModelScorer",
    "score_samples",
    "run_ttc",
    "ttc_rows",
]

logger = logging.getLogger(__name__)


def default_ns(max_n: int = 64) -> list[int]:
    """``[1, 2, 4, ..., max_n]`` (powers of two, plus ``max_n`` itself)."""
    check_ns([max_n])
    ns, n = [], 1
    while n < max_n:
        ns.append(n)
        n *= 2
    return ns + [max_n]


def check_ns(ns: Sequence[int]) -> list[int]:
    """Sorted, de-duplicated ``ns``; ``ValueError`` for an empty list or any N <= 0."""
    if not ns:
        raise ValueError("no N given")
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"N must be a positive integer, got {n!r}")
    return sorted(set(ns))


# ---------------------------------------------------------------------------- scoring math
def vote_accuracy(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> float:
    """Majority-vote accuracy of one problem (ties: expected accuracy of a random pick).

    ``answers[i]`` is sample i's extracted answer (None: unparseable, ignored);
    ``correct[i]`` whether sample i is correct.
    """
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    counts: dict[Hashable, int] = {}
    right: dict[Hashable, bool] = {}
    for a, c in zip(answers, correct, strict=True):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        right.setdefault(a, bool(c))
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [a for a, k in counts.items() if k == top]
    return sum(right[a] for a in winners) / len(winners)


def best_of_n_accuracy(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Best-of-N accuracy of one problem: the highest-scoring sample (ties averaged)."""
    if len(scores) != len(correct):
        raise ValueError("scores and correct must have the same length")
    if not scores:
        return 0.0
    best = max(scores)
    top = [c for s, c in zip(scores, correct, strict=True) if s == best]
    return sum(bool(c) for c in top) / len(top)


def _subsets(m: int, n: int, n_subsets: int, rng: random.Random) -> list[list[int]]:
    if n > m:
        raise ValueError(f"N={n} is larger than the {m} samples drawn")
    subsets = [list(range(n))]
    if n < m:
        subsets += [sorted(rng.sample(range(m), n)) for _ in range(n_subsets - 1)]
    return subsets


def _curve(
    values: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    ns: Sequence[int],
    n_subsets: int,
    seed: int,
    accuracy: Callable[[list, list], float],
) -> dict[int, float]:
    """Accuracy at each N from the same per-problem samples (subsets of them for N < max)."""
    ns = check_ns(ns)
    rng = random.Random(seed)
    out = {}
    for n in ns:
        total = 0.0
        for vals, cor in zip(values, correct, strict=True):
            subs = _subsets(len(vals), n, n_subsets, rng)
            total += sum(accuracy([vals[i] for i in s], [cor[i] for i in s]) for s in subs) / len(
                subs
            )
        out[n] = total / max(1, len(values))
    return out


def vote_curve(
    answers: Sequence[Sequence[Hashable | None]],
    correct: Sequence[Sequence[bool]],
    ns: Sequence[int],
    n_subsets: int = 1,
    seed: int = 0,
) -> dict[int, float]:
    """Majority-vote accuracy at each N, from the same per-problem samples."""
    return _curve(answers, correct, ns, n_subsets, seed, vote_accuracy)


def best_of_n_curve(
    scores: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    ns: Sequence[int],
    n_subsets: int = 1,
    seed: int = 0,
) -> dict[int, float]:
    """Best-of-N accuracy at each N, from the same per-problem samples."""
    return _curve(scores, correct, ns, n_subsets, seed, best_of_n_accuracy)


class RewardModelScorer:
    """Scores ``prompt + completion`` with any HF sequence-classification model: the
    single logit (``num_labels == 1``) or the last class's logit minus the first's."""

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
        except OSError as err:
            raise ValueError(f"cannot load reward model {path!r}: {err}") from err
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            s = logits[:, 0] if logits.shape[-1] == 1 else logits[:, -1] - logits[:, 0]
            scores += s.tolist()
        return scores


def score_samples(
    scorer: str | RewardModelScorer,
    source: Source,
    problems: Sequence[Problem],
    samples: Sequence[Sequence[Sample]],
    device: str | torch.device = "cpu",
) -> list[list[float]]:
    """Best-of-N scores: ``"verifier"``, ``"logprob"``, ``"rm:<path>"`` or a scorer."""
    if scorer == "verifier":
        return [
            [float(source.is_correct(p, s.text)) for s in ss]
            for p, ss in zip(problems, samples, strict=True)
        ]
    if scorer == "logprob":
        return [[s.logprob for s in ss] for ss in samples]
    if isinstance(scorer, str):
        if not scorer.startswith("rm:"):
            raise ValueError(f"unknown scorer {scorer!r}: use verifier, logprob or rm:<path>")
        scorer = RewardModelScorer(scorer[3:], device)
    flat_p = [p.prompt for p, ss in zip(problems, samples, strict=True) for _ in ss]
    flat_c = [s.text for ss in samples for s in ss]
    flat = scorer(flat_p, flat_c)
    out, k = [], 0
    for ss in samples:
        out.append(flat[k : k + len(ss)])
        k += len(ss)
    return out


def ttc_rows(
    source: Source,
    problems: Sequence[Problem],
    samples: Sequence[Sequence[Sample]],
    ns: Sequence[int],
    scorers: Sequence[str] = ("verifier",),
    n_subsets: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, dict[int, float]]:
    """``{"majority": {N: acc}, "best-of-n[<scorer>]": {N: acc}, ...}`` for one model."""
    correct = [
        [source.is_correct(p, s.text) for s in ss] for p, ss in zip(problems, samples, strict=True)
    ]
    answers = [
        [source.extract(p, s.text) for s in ss] for p, ss in zip(problems, samples, strict=True)
    ]
    curves = {"majority": vote_curve(answers, correct, ns, n_subsets, seed)}
    for sc in scorers:
        scores = score_samples(sc, source, problems, samples, device)
        curves[f"best-of-n[{sc}]"] = best_of_n_curve(scores, correct, ns, n_subsets, seed)
    return curves


def run_ttc(
    models: Sequence[Any],
    source: Source,
    ns: Sequence[int],
    *,
    conditions: Sequence[Any] | None = None,
    scorers: Sequence[str] = ("verifier",),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 96,
    n_subsets: int = 1,
    sample_seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    title: str = "test-time compute",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> Any:
    """Accuracy vs N (majority vote, best-of-N per scorer) for every model × condition.

    ``models``: :class:`afm.evaluate.specs.ModelSpec` or ``(label, model, tokenizer)``;
    ``conditions``: :class:`afm.evaluate.Condition` (default: FP only).  For every
    model, condition and noise seed, ``max(ns)`` samples per problem are drawn once and
    reused for every N.  Returns an :class:`afm.evaluate.report.EvalReport` with one row per
    (model [method], N), scores over noise seeds.
    """
    ns = check_ns(ns)
    conditions = list(conditions or [Condition("fp")])
    problems = source.problems()
    if not problems:
        raise ValueError(f"{source.name}: no problems")
    rows: dict[tuple[str, int], ResultRow] = {}
    with contextlib.closing(chip_runs(models, conditions, device=device)) as runs:
        for run in runs:
            samples = sample_completions(
                run.model,
                run.tokenizer,
                [p.prompt for p in problems],
                max(ns),
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                stop=source.stop,
                seed=sample_seed,
                batch_size=batch_size,
                progress=progress,
            )
            curves = ttc_rows(
                source, problems, samples, ns, scorers, n_subsets, sample_seed, device
            )
            _record(rows, run, source.name, curves)
    meta = dict(meta or {})
    meta.update(
        {
            "ns": ns,
            "temperature": temperature,
            "top_p": top_p,
            "n_problems": len(problems),
            "scorers": list(scorers),
            "n_subsets": n_subsets,
        }
    )
    return EvalReport(list(rows.values()), meta, title, layout="conditions")


def _record(
    rows: dict[tuple[str, int], ResultRow],
    run: ChipRun,
    task: str,
    curves: dict[str, dict[int, float]],
) -> None:
    cond = run.condition
    name = run.label if cond.label == "fp" else f"{run.label} {cond.label}"
    for method, curve in curves.items():
        for n, acc in curve.items():
            key = (f"{name} [{method}]", n)
            if key not in rows:
                params = {"method": method, "model": run.label, "condition": cond.label}
                rows[key] = ResultRow(
                    key[0], task, "accuracy", f"N={n}", [], [], float(n), "N", params
                )
            rows[key].scores.append(acc)
            rows[key].seeds.append(run.seed if cond.noise else None)
