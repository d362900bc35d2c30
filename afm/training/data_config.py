"""The recipe of a synthetic corpus sampled from the FP teacher (``data.*`` keys)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from afm.seeds import derive_seed
from afm.validation import check_bool, check_choice, check_int, check_real, fail

__all__ = ["TARGET_FORMS", "CorpusConfig", "DataError", "SyntheticDataConfig", "shard_seed"]

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
        check_real("data", "temperature", self.temperature)  # 0 = greedy
        check_int("data", "top_k", self.top_k, minimum=1, allow_none=True)
        if self.top_p is not None:
            check_real("data", "top_p", self.top_p, strict=True, maximum=1.0)
        if self.prompts_file is not None and not isinstance(self.prompts_file, str):
            bad("prompts_file", "must be a path or None")
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


@dataclass(frozen=True)
class CorpusConfig:
    """The user's own corpus (``corpus.*`` keys): read, tokenized with the teacher's
    tokenizer, packed into ``data.seq_len`` rows (:mod:`afm.training.corpus`)."""

    path: str | None = None
    """A ``datasets.save_to_disk`` directory, a local ``.jsonl`` / ``.json`` /
    ``.parquet`` / ``.txt`` file, a directory or glob of such files, or a hub dataset
    id; None: no corpus (teacher-generated data only)."""
    name: str | None = None
    """The hub dataset's configuration (``load_dataset(path, name)``)."""
    split: str = "train"
    text_column: str = "text"
    messages_column: str | None = None
    """A column of chat ``messages`` (lists of ``{"role", "content"}``), rendered with
    the tokenizer's chat template; None: ``text_column`` holds plain text."""
    mix: float = 1.0
    """Fraction of the training rows taken from the corpus: 1 (corpus only, nothing
    is generated) or in (0, 1) (the rest teacher-generated by the ``data.*`` recipe)."""
    max_tokens: int | None = None
    """Stop reading after this many packed tokens (None: the whole corpus)."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole (local files are always
    read as a stream)."""
    add_eos: bool = True
    """End every document with the tokenizer's EOS before packing."""
    rows_per_shard: int = 1024

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            fail("corpus", "path", self.path, "must be a non-empty string or None")
        for name in ("name", "messages_column"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                fail("corpus", name, value, "must be a string or None")
        for name in ("split", "text_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail("corpus", name, getattr(self, name), "must be a non-empty string")
        check_real("corpus", "mix", self.mix, minimum=0.0, strict=True, maximum=1.0)
        check_int("corpus", "max_tokens", self.max_tokens, minimum=1, allow_none=True)
        check_int("corpus", "rows_per_shard", self.rows_per_shard, minimum=1)
        check_bool("corpus", "streaming", self.streaming)
        check_bool("corpus", "add_eos", self.add_eos)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the packed rows (the mix ratio and the shard size
        do not)."""
        d = dataclasses.asdict(self)
        for k in ("mix", "streaming", "rows_per_shard"):
            d.pop(k)
        return d


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``: a hash of (seed, index), independent of the worker count."""
    return derive_seed("afm-shard", seed, index)
