"""The recipe of a synthetic corpus sampled from the FP teacher (``data.*`` keys)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from afm.seeds import derive_seed
from afm.validation import check_choice, check_int, check_real, fail

__all__ = ["TARGET_FORMS", "DataError", "SyntheticDataConfig", "shard_seed"]

_EOS_MODES = ("ignore", "pack")
_BACKENDS = ("auto", "hf", "vllm")
TARGET_FORMS = ("none", "top_k", "sampled", "both")
"""Sparse teacher targets stored per position (afm.training.teacher_targets)."""
_TARGET_FIELDS = ("targets", "targets_k", "targets_samples", "targets_proposal_temperature")


class DataError(ValueError):
    """Missing, empty or inconsistent synthetic data."""


@dataclass(frozen=True)
class SyntheticDataConfig:
    """How to sample the synthetic corpus (paper: T = 1, 4096 tokens, from BOS, 20 B tokens)."""

    num_tokens: int = 1_000_000
    """Token budget; the shard count is ``ceil(num_tokens / (seq_len · sequences_per_shard))``."""
    seq_len: int = 4096
    """Tokens per stored sequence, BOS included."""
    sequences_per_shard: int = 256
    batch_size: int = 32
    """Sequences per ``generate`` call (part of the shard's recipe: changes the samples)."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos: str = "ignore"
    """"ignore": sample past EOS; "pack": stop a document at EOS and pack documents
    into full ``seq_len`` rows."""
    prompts_file: str | None = None
    """Text file, one prompt per line; None samples from BOS alone."""
    seed: int = 0
    backend: str = "auto"
    """"hf" (transformers generate), "vllm", or "auto" (vLLM when installed and on GPU)."""
    targets: str = "top_k"
    """Sparse teacher targets stored with the tokens, so that training needs no live
    teacher: "top_k" (the ``targets_k`` largest log-probs; the default: within noise of
    live KD on the tiny main job, docs/training.md, and vLLM can produce it), "sampled"
    (random-sampling KD: ``targets_samples`` ids drawn from the proposal with their
    importance weights), "both", or "none" (train with the live teacher)."""
    targets_k: int = 12
    targets_samples: int = 12
    targets_proposal_temperature: float = 1.0
    """Proposal of the sampled form: ``q ∝ p^(1/τ)`` (1: the teacher itself)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            fail("data", name, getattr(self, name), why)

        for name in ("num_tokens", "seq_len", "sequences_per_shard", "batch_size"):
            check_int("data", name, getattr(self, name), minimum=1)
        if self.seq_len < 2:
            bad("seq_len", "must be >= 2")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        check_int("data", "top_k", self.top_k, minimum=1, allow_none=True)
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            bad("top_p", "must be in (0, 1] or None")
        check_choice("data", "eos", self.eos, _EOS_MODES)
        check_choice("data", "backend", self.backend, _BACKENDS)
        check_int("data", "seed", self.seed)
        check_choice("data", "targets", self.targets, TARGET_FORMS)
        check_int("data", "targets_k", self.targets_k, minimum=1)
        check_int("data", "targets_samples", self.targets_samples, minimum=1)
        check_real("data", "targets_proposal_temperature", self.targets_proposal_temperature,
                   minimum=0.0, strict=True)  # fmt: skip

    @property
    def target_forms(self) -> tuple[str, ...]:
        """The stored sparse forms: () , ("top_k",), ("sampled",) or both."""
        return {"none": (), "both": ("top_k", "sampled")}.get(self.targets, (self.targets,))

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_tokens / (self.seq_len * self.sequences_per_shard))

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the samples (``backend`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("backend")
        if self.targets == "none":  # the recipe of a directory written before targets existed
            for name in _TARGET_FIELDS:
                d.pop(name)
        return d


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``: a hash of (seed, index), independent of the worker count."""
    return derive_seed("afm-shard", seed, index)
