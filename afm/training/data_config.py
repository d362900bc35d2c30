"""The recipe of a synthetic corpus sampled from the FP teacher (``data.*`` keys)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from afm.seeds import derive_seed
from afm.validation import check_choice, check_int, check_real, fail

__all__ = ["DataError", "SyntheticDataConfig", "shard_seed"]

_EOS_MODES = ("ignore", "pack")
_BACKENDS = ("auto", "hf", "vllm")


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

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_tokens / (self.seq_len * self.sequences_per_shard))

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the samples (``backend`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("backend")
        return d


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``: a hash of (seed, index), independent of the worker count."""
    return derive_seed("afm-shard", seed, index)
