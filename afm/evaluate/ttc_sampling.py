"""Problems and sampled completions for test-time-compute scaling (:mod:`afm.evaluate.ttc`).

Sources of problems: :class:`ToyArithSource` (the bundled ``toyworld_arith`` test
problems, offline) and :class:`LmEvalSource` (any lm-eval ``generate_until`` task; its
filters extract the answer and its ``process_results`` checks it).
:func:`sample_completions` draws ``n`` completions per prompt in seeded batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from afm.evaluate.runners import LmEvalRunner, spread_indices
from afm.evaluate.specs import TaskSpec, bundled_tasks_dir
from afm.toyworld.scoring import parse_answer

__all__ = ["LmEvalSource", "Problem", "Sample", "Source", "ToyArithSource", "sample_completions"]


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
