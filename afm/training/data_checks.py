"""Checks of a synthetic corpus and its recipe against the teacher, made before
anything is sampled or written: sequences that fit the model's context, a sampling
backend that is installed, token ids the model's embedding holds.

Each failure is a :class:`~afm.training.data_config.DataError` (one line: the field or
the directory, the value, what to do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from afm.training.data_config import DataError, SyntheticDataConfig

__all__ = ["check_seq_len", "check_token_ids", "context_length", "resolve_backend"]

#: config.json keys that hold a model's context length, by model family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


def context_length(model_config: Any) -> tuple[int, str] | None:
    """``(positions, config key)`` of the longest sequence the model takes, if known."""
    for key in _CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_seq_len(cfg: SyntheticDataConfig, model_config: Any, model_name: str) -> None:
    """``data.seq_len`` must fit the model: longer samples crash mid-generation."""
    known = context_length(model_config)
    if known is not None and cfg.seq_len > known[0]:
        raise DataError(
            f"data.seq_len={cfg.seq_len} is invalid: {model_name!r} takes at most "
            f"{known[0]} positions ({known[1]} in its config.json); set data.seq_len <= "
            f"{known[0]}"
        )


def resolve_backend(cfg: SyntheticDataConfig) -> str:
    """The sampling backend ``data.backend`` names, "hf" or "vllm" ("auto": vLLM when
    it is installed and a GPU is present)."""
    if cfg.backend == "hf":
        return "hf"
    try:
        import vllm  # noqa: F401

        have_vllm = True
    except ImportError:
        have_vllm = False
    if cfg.backend == "vllm":
        if not have_vllm or not torch.cuda.is_available():
            missing = "vLLM is not installed" if not have_vllm else "no CUDA GPU is available"
            raise DataError(
                f"data.backend='vllm' is invalid here: {missing} (pip install vllm on a GPU "
                "machine, or use data.backend=hf)"
            )
        return "vllm"
    return "vllm" if have_vllm and torch.cuda.is_available() else "hf"


def check_token_ids(dataset: Any, vocab_size: int, where: str | Path) -> None:
    """Every row of ``dataset`` (a ``datasets.Dataset`` with column ``input_ids``) is
    non-empty and its ids index the model's embedding: ids from another tokenizer would
    crash training mid-way.  ``where`` names the data in the error (a directory)."""
    import pyarrow.compute as pc

    name = f"data directory {str(where)!r}" if isinstance(where, Path) else str(where)
    column = dataset.data.table.column("input_ids")
    lengths = pc.min_max(pc.list_value_length(column))
    if lengths["min"].as_py() is not None and lengths["min"].as_py() < 1:
        raise DataError(f"{name} holds empty sequences")
    ids = pc.min_max(pc.list_flatten(column))
    low, high = ids["min"].as_py(), ids["max"].as_py()
    if low is not None and (low < 0 or high >= vocab_size):
        raise DataError(
            f"{name} holds token ids {low}..{high}, outside the model's vocabulary of "
            f"{vocab_size}: the data was made with another tokenizer"
        )
