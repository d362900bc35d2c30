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

Sources of problems: :class:`ToyArithSource` (the bundled ``toyworld_arith`` test
problems, offline) and :class:`LmEvalSource` (any lm-eval ``generate_until`` task; its
filters extract the answer and its ``process_results`` checks it).  Scorers for
best-of-N: ``"verifier"`` (the task's own check: an oracle, i.e. pass@N),
``"logprob"`` (mean token log-probability of the sample under the sampling model) or
``"rm:<path>"`` (any HF sequence-classification reward model).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "Problem",
    "Sample",
    "ToyArithSource",
    "LmEvalSource",
    "sample_completions",
    "vote_accuracy",
    "best_of_n_accuracy",
    "vote_curve",
    "best_of_n_curve",
    "default_ns",
    "check_ns",
    "RewardModelScorer",
    "score_samples",
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


# ---------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    target: Any
    doc: Any = None


@dataclass(frozen=True)
class Sample:
    text: str
    logprob: float  # mean token log-probability (under the sampling distribution)
    n_tokens: int


class Source(Protocol):
    name: str
    stop: tuple[str, ...]

    def problems(self) -> list[Problem]: ...

    def extract(self, problem: Problem, text: str) -> Hashable | None: ...

    def is_correct(self, problem: Problem, text: str) -> bool: ...


class ToyArithSource:
    """The bundled ``toyworld_arith`` test problems (same file as the lm-eval task)."""

    name = "toyworld_arith"
    stop = ("\n",)

    def __init__(self, limit: int | None = None, offset: int = 0, spread: bool = False) -> None:
        from afm.eval_runners import spread_indices
        from afm.evaluate import bundled_tasks_dir

        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        path = bundled_tasks_dir() / "toyworld" / "arith.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if spread:
            rows = [rows[i] for i in spread_indices(len(rows), limit)]
        else:
            rows = rows[offset : offset + limit if limit else None]
        self._problems = [
            Problem(f"{r['a']}{r['op']}{r['b']}", r["prompt"], int(r["answer"])) for r in rows
        ]

    def problems(self) -> list[Problem]:
        return list(self._problems)

    def extract(self, problem: Problem, text: str) -> int | None:
        from afm.toyworld import parse_answer

        return parse_answer(text.split("\n")[0])

    def is_correct(self, problem: Problem, text: str) -> bool:
        return self.extract(problem, text) == problem.target


class LmEvalSource:
    """A ``generate_until`` lm-eval task: prompts with its few-shot context; answers
    extracted by its first filter pipeline and checked by its ``process_results``."""

    def __init__(
        self,
        task: str,
        *,
        num_fewshot: int | None = None,
        limit: int | None = None,
        include_path: Sequence[str] | None = None,
        metric: str | None = None,
        fewshot_seed: int = 1234,
    ) -> None:
        from afm.eval_runners import LmEvalRunner
        from afm.evaluate import TaskSpec

        runner = LmEvalRunner(
            [TaskSpec(task, num_fewshot)], include_path=include_path, fewshot_seed=fewshot_seed
        )
        ((spec, loaded, _),) = runner.loaded
        if len(loaded["tasks"]) != 1:
            raise ValueError(f"--ttc needs a single task, {task!r} has {len(loaded['tasks'])}")
        self.task = next(iter(loaded["tasks"].values()))
        if self.task.get_config("output_type") != "generate_until":
            raise ValueError(f"--ttc needs a generate_until task; {task!r} is not one")
        self.name = task
        self.metric = metric
        self.task.set_fewshot_seed(seed=fewshot_seed)
        self.task.build_all_requests(limit=limit, rank=0, world_size=1)
        until = (self.task.get_config("generation_kwargs") or {}).get("until") or []
        self.stop = tuple([until] if isinstance(until, str) else until)
        self._problems = [
            Problem(str(inst.doc_id), inst.args[0], self.task.doc_to_target(inst.doc), inst.doc)
            for inst in self.task.instances
        ]

    def problems(self) -> list[Problem]:
        return list(self._problems)

    def _filtered(self, problem: Problem, text: str) -> Any:
        resps: Any = [[text]]
        for f in self.task._filters[0].filters:
            resps = list(f().apply(resps, [problem.doc]))  # filters may return maps
        out = resps[0]
        if not isinstance(out, (str, list, tuple)) and hasattr(out, "__iter__"):
            out = list(out)
        return out[0] if isinstance(out, list) and len(out) == 1 else out

    def extract(self, problem: Problem, text: str) -> Hashable | None:
        ans = self._filtered(problem, text)
        if ans is None or (isinstance(ans, str) and ans.strip() in ("", "[invalid]")):
            return None
        return ans.strip() if isinstance(ans, str) else str(ans)

    def is_correct(self, problem: Problem, text: str) -> bool:
        res = self.task.process_results(problem.doc, [self._filtered(problem, text)])
        if self.metric is not None:
            return float(res[self.metric]) > 0
        return float(next(iter(res.values()))) > 0


# ---------------------------------------------------------------------------- sampling
def _truncate(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 96,
    stop: Sequence[str] = ("\n",),
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> list[list[Sample]]:
    """``n`` sampled completions per prompt (truncated at the first ``stop`` string).

    Batches hold ``batch_size`` sequences (prompts × samples); every batch is seeded
    from ``seed`` and its position, so results do not depend on the model's history.
    """
    if n <= 0:
        raise ValueError(f"N must be > 0, got {n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    device = next(model.parameters()).device
    per_prompt = min(n, batch_size)
    prompts_per_batch = max(1, batch_size // per_prompt)
    eos = [tokenizer.eos_token_id]
    stop_ids = []
    for s in stop:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s)) if s else []
        if len(ids) == 1 and ids[0] is not None and ids[0] >= 0:
            stop_ids.append(ids[0])
    eos += stop_ids
    multi_token_stop = [s for s in stop if s and len(tokenizer.tokenize(s)) != 1]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[list[Sample]] = [[] for _ in prompts]
    jobs = [
        (i, min(per_prompt, n - k))
        for start in range(0, len(prompts), prompts_per_batch)
        for k in range(0, n, per_prompt)
        for i in range(start, min(start + prompts_per_batch, len(prompts)))
    ]
    # group jobs into batches with the same number of samples per prompt
    batches: list[tuple[list[int], int]] = []
    for i, k in jobs:
        if batches and batches[-1][1] == k and len(batches[-1][0]) < prompts_per_batch:
            batches[-1][0].append(i)
        else:
            batches.append(([i], k))
    try:
        for b, (idx, k) in enumerate(tqdm(batches, desc="sampling", disable=not progress)):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            enc = {k_: v.to(device) for k_, v in enc.items() if k_ != "token_type_ids"}
            torch.manual_seed(seed * 1_000_003 + b)
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
                stop_strings=multi_token_stop or None,
                tokenizer=tokenizer if multi_token_stop else None,
            )
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            trans = model.compute_transition_scores(
                gen.sequences, gen.scores, normalize_logits=True
            )
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            valid = new != tokenizer.pad_token_id
            for j, text in enumerate(texts):
                lp = trans[j][valid[j]]
                lp = lp[torch.isfinite(lp)]
                mean_lp = float(lp.mean()) if lp.numel() else -math.inf
                out[idx[j // k]].append(Sample(_truncate(text, stop), mean_lp, int(lp.numel())))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


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

    ``models``: :class:`afm.evaluate.ModelSpec` or ``(label, model, tokenizer)``;
    ``conditions``: :class:`afm.evaluate.Condition` (default: FP only).  For every
    model, condition and noise seed, ``max(ns)`` samples per problem are drawn once and
    reused for every N.  Returns an :class:`afm.report.EvalReport` with one row per
    (model [method], N), scores over noise seeds.
    """
    from afm.evaluate import Condition, ModelSpec, load_model_spec
    from afm.noise import apply_noise_
    from afm.report import EvalReport, ResultRow

    ns = check_ns(ns)
    conditions = list(conditions or [Condition("fp")])
    problems = source.problems()
    if not problems:
        raise ValueError(f"{source.name}: no problems")
    rows: dict[tuple[str, int], ResultRow] = {}
    for item in models:
        if isinstance(item, ModelSpec):
            label = item.name
            model, tokenizer = load_model_spec(item, device)
        else:
            label, model, tokenizer = item
        for cond in conditions:
            name = label if cond.label == "fp" else f"{label} {cond.label}"
            for seed in cond.seeds:
                handle = apply_noise_(model, cond.noise, seed) if cond.noise else None
                try:
                    samples = sample_completions(
                        model,
                        tokenizer,
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
                finally:
                    if handle is not None:
                        handle.restore()
                curves = ttc_rows(
                    source, problems, samples, ns, scorers, n_subsets, sample_seed, device
                )
                for method, curve in curves.items():
                    for n, acc in curve.items():
                        key = (f"{name} [{method}]", n)
                        if key not in rows:
                            rows[key] = ResultRow(
                                key[0],
                                source.name,
                                "accuracy",
                                f"N={n}",
                                [],
                                [],
                                float(n),
                                "N",
                                {"method": method, "model": label, "condition": cond.label},
                            )
                        rows[key].scores.append(acc)
                        rows[key].seeds.append(seed if cond.noise else None)
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
