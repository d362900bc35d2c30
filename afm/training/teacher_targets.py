"""Sparse teacher targets: what the sampler stores per position so that training needs
no live teacher.

While it samples, the teacher computes its next-token distribution ``p`` at every
position of every sequence it writes.  Two sparse forms of it are kept, per position,
in the same Arrow shards as the tokens (``data.targets``):

``top_k``    the ``k`` largest log-probs of ``p`` (ids int32, log-probs fp16).  Training
             renormalises them over the k ids: a biased target (the tail is dropped),
             exact for ``k = vocab``.
``sampled``  random-sampling KD (Anshumann et al., ACL 2025): ``n`` ids drawn with
             replacement from a proposal ``q ∝ p^(1/τ)``, each with its importance
             weight ``p(x) / (n·q(x))`` (ids int32, weights fp16), plus the entropy
             ``H(p)`` (fp32) for the logged KL.  ``Σ_x w(x)·(−log s(x))`` is an unbiased
             estimate of the cross entropy of the student ``s`` to ``p``, and its
             gradient of the full-KL gradient.

The targets are the teacher's **raw** distribution (T = 1, before the sampler's own
temperature / top-k / top-p), i.e. what the live teacher gives the KD loss.  They are
taken from the logits of the teacher's own forward passes inside ``generate`` (a
forward hook on the model; generate computes the last position's logits only), so the
sampled tokens are exactly those of a run without targets.  Positions without a
target (prompt tokens before the last one; the last token of a document that ended
every row of its batch) have ids ``-1`` and are left out of the loss.

Columns are flat per row (``positions × k``), so Arrow stores one offset per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from afm.training.data_config import DataError, SyntheticDataConfig

__all__ = [
    "COLUMNS",
    "CachedTargets",
    "TargetRecorder",
    "TargetSpec",
    "concat_targets",
    "missing_targets",
    "resolve_target_form",
    "row_targets",
    "sparse_target_tensors",
    "sparse_targets",
    "stored_forms",
    "target_features",
    "tokens_only",
]

# column → (form, dtype, values per position: "k", "n" or 1)
COLUMNS: dict[str, tuple[str, Any, str]] = {
    "top_k_ids": ("top_k", np.int32, "k"),
    "top_k_logprobs": ("top_k", np.float16, "k"),
    "sampled_ids": ("sampled", np.int32, "n"),
    "sampled_weights": ("sampled", np.float16, "n"),
    "entropy": ("sampled", np.float32, "1"),
}


@dataclass(frozen=True)
class TargetSpec:
    """Which sparse forms to store and their sizes (from ``SyntheticDataConfig``)."""

    forms: tuple[str, ...]
    k: int = 12
    samples: int = 12
    proposal_temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: SyntheticDataConfig) -> TargetSpec:
        return cls(
            cfg.target_forms, cfg.targets_k, cfg.targets_samples, cfg.targets_proposal_temperature
        )

    def columns(self) -> list[str]:
        return [c for c, (form, _, _) in COLUMNS.items() if form in self.forms]

    def width(self, column: str) -> int:
        return {"k": self.k, "n": self.samples, "1": 1}[COLUMNS[column][2]]

    def bytes_per_token(self) -> int:
        """Stored bytes per position (Arrow adds one offset per row and column)."""
        return sum(self.width(c) * np.dtype(COLUMNS[c][1]).itemsize for c in self.columns())


# --------------------------------------------------------------------------- computing


@torch.no_grad()
def sparse_target_tensors(
    logits: Tensor, spec: TargetSpec, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """The sparse targets of ``[B, V]`` raw logits, as ``{column: [B, width]}`` tensors in
    their stored dtypes, on the logits' device (no host copy, no device sync)."""
    vocab = logits.shape[-1]
    if spec.k > vocab and "top_k" in spec.forms:
        raise DataError(f"data.targets_k={spec.k} is larger than the vocabulary ({vocab})")
    logp = torch.log_softmax(logits.float(), dim=-1)  # (faster than logsumexp on CPU)
    out: dict[str, Tensor] = {}
    if "top_k" in spec.forms:
        values, ids = logp.topk(spec.k, dim=-1)
        out["top_k_ids"] = ids.to(torch.int32)
        out["top_k_logprobs"] = values.to(torch.float16)
    if "sampled" in spec.forms:
        tau = spec.proposal_temperature
        p = logp.exp()
        logq = logp if tau == 1.0 else torch.log_softmax(logits.float() / tau, dim=-1)
        q = p if tau == 1.0 else logq.exp()
        ids = torch.multinomial(q, spec.samples, replacement=True, generator=generator)
        weights = (logp.gather(1, ids) - logq.gather(1, ids)).exp() / spec.samples
        out["sampled_ids"] = ids.to(torch.int32)
        out["sampled_weights"] = weights.to(torch.float16)
        out["entropy"] = -(p * logp).sum(-1, keepdim=True)
    return out


def sparse_targets(
    logits: Tensor, spec: TargetSpec, generator: torch.Generator | None
) -> dict[str, np.ndarray]:
    """The sparse targets of ``[B, V]`` raw logits, as ``{column: [B, width]}`` arrays."""
    return {c: t.cpu().numpy() for c, t in sparse_target_tensors(logits, spec, generator).items()}


def missing_targets(n: int, spec: TargetSpec) -> dict[str, np.ndarray]:
    """``n`` positions without a target (ids -1, values 0)."""
    out = {}
    for c in spec.columns():
        fill = -1 if c.endswith("_ids") else 0
        out[c] = np.full((n, spec.width(c)), fill, dtype=COLUMNS[c][1])
    return out


def concat_targets(parts: Sequence[dict[str, np.ndarray]], spec: TargetSpec) -> dict:
    if not parts:
        return missing_targets(0, spec)
    return {c: np.concatenate([p[c] for p in parts]) for c in spec.columns()}


def row_targets(
    steps: dict[str, np.ndarray], row: int, prompt_len: int, length: int, spec: TargetSpec
) -> dict[str, np.ndarray]:
    """The per-position targets of one sampled sequence of ``length`` tokens.

    ``steps[column]`` is ``[decoding steps, batch, width]``; step ``t``'s logits are the
    distribution of generated token ``t``, i.e. the target of position
    ``prompt_len − 1 + t``; earlier prompt positions have none."""
    n_steps = len(next(iter(steps.values()))) if steps else 0
    have = max(0, min(n_steps, length - (prompt_len - 1)))
    parts = [missing_targets(prompt_len - 1, spec)]
    if have:
        parts.append({c: steps[c][:have, row] for c in spec.columns()})
    parts.append(missing_targets(length - (prompt_len - 1) - have, spec))
    return concat_targets(parts, spec)


class TargetRecorder:
    """A forward hook that turns each of ``generate``'s forward passes into sparse targets
    of the last position (``with TargetRecorder(model, spec, gen) as rec: generate``;
    then ``rec.arrays()``).

    The targets stay on the model's device until ``arrays()``: one host copy per batch
    instead of a device sync in every decoding step."""

    def __init__(self, model: Any, spec: TargetSpec, generator: torch.Generator | None):
        self.model, self.spec, self.generator = model, spec, generator
        self._steps: list[dict[str, Tensor]] = []
        self._handle = None

    def _hook(self, _module, _args, output) -> None:  # noqa: ANN001
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._steps.append(sparse_target_tensors(logits[:, -1], self.spec, self.generator))

    def arrays(self) -> dict[str, np.ndarray]:
        """``{column: [decoding steps, batch, width]}`` of every forward pass so far."""
        if not self._steps:
            return {}
        return {
            c: torch.stack([s[c] for s in self._steps]).cpu().numpy() for c in self.spec.columns()
        }

    def __enter__(self) -> TargetRecorder:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def target_features(spec: TargetSpec) -> dict[str, Any]:
    """The ``datasets`` feature of each target column (flat list per row)."""
    from datasets import Sequence as DsSequence
    from datasets import Value

    names = {np.int32: "int32", np.float16: "float16", np.float32: "float32"}
    return {c: DsSequence(Value(names[COLUMNS[c][1]])) for c in spec.columns()}


# --------------------------------------------------------------------------- reading


def stored_forms(dataset: Any) -> tuple[str, ...]:
    """The sparse forms whose every column ``dataset`` holds."""
    names = set(getattr(dataset, "column_names", None) or [])
    forms = []
    for form in ("top_k", "sampled"):
        cols = [c for c, (f, _, _) in COLUMNS.items() if f == form]
        if all(c in names for c in cols):
            forms.append(form)
    return tuple(forms)


def resolve_target_form(dataset: Any, kd_targets: str) -> str | None:
    """``train.kd_targets`` for ``dataset``: the cached form to train on, or None (live)."""
    stored = stored_forms(dataset)
    if kd_targets == "auto":
        return next((f for f in ("sampled", "top_k") if f in stored), None)
    if kd_targets == "live":
        return None
    if kd_targets not in stored:
        raise DataError(
            f"train.kd_targets={kd_targets!r}: the training rows hold no cached {kd_targets!r} "
            f"teacher targets (stored: {', '.join(stored) or 'none'}; rows of corpus.path never "
            "have any); use train.kd_targets=auto or live"
        )
    return kd_targets


def tokens_only(dataset: Any) -> Any:
    """``dataset`` without its target columns (batches then read only ``input_ids``)."""
    names = getattr(dataset, "column_names", None)
    if names and set(names) & set(COLUMNS):
        return dataset.select_columns(["input_ids"])
    return dataset


class CachedTargets:
    """The stored targets of one form as padded tensors for a batch of rows.

    ``batch(idx, width)`` returns ``ids [B, W, m]`` (int64, 0 where missing),
    ``weights [B, W, m]`` fp32 (the target mass of each id; the top-k log-probs
    renormalised over the k ids), ``const [B, W]`` fp32 (``Σ t·log t`` for top-k,
    ``−H(p)`` for sampled: the KL's teacher term, for logging) and ``valid [B, W]``.
    """

    def __init__(self, dataset: Any, form: str) -> None:
        if form not in stored_forms(dataset):
            raise DataError(
                f"the synthetic data holds no {form!r} teacher targets "
                f"(it holds {list(stored_forms(dataset)) or 'none'}); regenerate it with "
                f"data.targets={form} or set train.kd_targets=live"
            )
        self.form = form
        cols = ["top_k_ids", "top_k_logprobs"] if form == "top_k" else [
            "sampled_ids", "sampled_weights", "entropy",
        ]  # fmt: skip
        self.data = dataset.select_columns(["input_ids", *cols]).with_format("numpy")
        self.cols = cols

    def batch(self, idx: Sequence[int], width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows = self.data[list(idx)]
        b = len(rows["input_ids"])
        lengths = [len(t) for t in rows["input_ids"]]
        m = len(rows[self.cols[0]][0]) // lengths[0]
        ids = np.full((b, width, m), -1, np.int64)
        vals = np.zeros((b, width, m), np.float32)
        ent = np.zeros((b, width), np.float32)
        for r, n_pos in enumerate(lengths):
            ids[r, :n_pos] = np.asarray(rows[self.cols[0]][r]).reshape(n_pos, m)
            vals[r, :n_pos] = np.asarray(rows[self.cols[1]][r], np.float32).reshape(n_pos, m)
            if self.form == "sampled":
                ent[r, :n_pos] = np.asarray(rows["entropy"][r], dtype=np.float32)
        valid = ids[..., 0] >= 0
        ids_t = torch.from_numpy(ids).clamp_min_(0)
        vals_t = torch.from_numpy(vals)
        if self.form == "top_k":
            # Renormalised over the k ids: t = softmax(log p_topk).
            logt = torch.log_softmax(vals_t, dim=-1)
            weights = logt.exp()
            const = (weights * logt).sum(-1)
        else:
            weights = vals_t
            const = -torch.from_numpy(ent)
        valid_t = torch.from_numpy(valid)
        weights = weights * valid_t[..., None]
        const = const * valid_t
        return ids_t, weights, const, valid_t
