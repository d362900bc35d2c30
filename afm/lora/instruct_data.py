"""Instruction and RL data for afm's TRL modes: bundled toy-world tasks, local files,
``datasets`` directories and hub datasets, checked for the columns each mode needs.

* :func:`load_rows_source` — ``--task``: a bundled task name (``arith``, ``mul``, ...),
  a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a ``save_to_disk``
  directory, or a hub dataset id (for users who have the hub);
* :func:`sft_format` / :func:`check_grpo_columns` — which of TRL's formats a dataset
  is in, or a :class:`InstructDataError` naming the columns it has and needs;
* :func:`task_rows` — a bundled task as SFT rows (``prompt`` / ``completion``) or GRPO
  rows (``prompt`` / ``answer``, the integer after ``Answer:``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from afm.lora.experiment import held_out_split
from afm.toyworld import lora_tasks
from afm.toyworld.scoring import parse_answer

__all__ = [
    "FILE_FORMATS",
    "InstructDataError",
    "check_grpo_columns",
    "held_out",
    "load_rows_source",
    "sft_format",
    "task_rows",
    "to_dataset",
]

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class InstructDataError(ValueError):
    """A dataset that cannot be loaded or lacks the columns a mode needs."""


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def sft_format(columns: Sequence[str], first: Mapping[str, Any], source: str) -> str:
    """``"prompt-completion"``, ``"messages"`` or ``"text"`` (TRL's SFT formats)."""
    cols = set(columns)
    if {"prompt", "completion"} <= cols:
        for key in ("prompt", "completion"):
            value = first[key]
            if not isinstance(value, str) and not _is_conversation(value):
                raise InstructDataError(
                    f"dataset {source}: column {key!r} must hold strings or message lists "
                    f"([{{'role', 'content'}}]), got {type(value).__name__}"
                )
        return "prompt-completion"
    if "messages" in cols:
        if not _is_conversation(first["messages"]):
            raise InstructDataError(
                f"dataset {source}: column 'messages' must hold lists of "
                "{'role': ..., 'content': ...} messages"
            )
        return "messages"
    if "text" in cols:
        return "text"
    raise InstructDataError(
        f"dataset {source} has columns {sorted(cols)}; SFT needs 'prompt' and "
        "'completion', or 'messages', or 'text'"
    )


def is_conversational(first: Mapping[str, Any]) -> bool:
    return any(_is_conversation(first.get(k)) for k in ("prompt", "completion", "messages"))


def check_grpo_columns(columns: Sequence[str], first: Mapping[str, Any], source: str) -> None:
    """GRPO needs a ``prompt`` column (string or message list)."""
    if "prompt" not in columns:
        raise InstructDataError(
            f"dataset {source} has columns {sorted(columns)}; GRPO needs a 'prompt' column "
            "(and the columns its rewards read, e.g. 'answer' for exact-match)"
        )
    if not isinstance(first["prompt"], str) and not _is_conversation(first["prompt"]):
        raise InstructDataError(
            f"dataset {source}: column 'prompt' must hold strings or message lists, got "
            f"{type(first['prompt']).__name__}"
        )


def task_rows(name: str, mode: str, seed: int = 0) -> list[dict[str, Any]]:
    """A bundled task's training examples as rows for ``mode`` (``sft`` or ``grpo``)."""
    task = lora_tasks.get_task(name)
    pairs = task.train_examples(seed)
    if mode == "sft":
        return [{"prompt": p, "completion": c} for p, c in pairs]
    rows = []
    for p, c in pairs:
        answer = parse_answer(c)
        if answer is None:
            raise InstructDataError(
                f"task {name!r} has no 'Answer: <int>' completions for GRPO's exact-match "
                "reward; use an arithmetic task (arith, mul) or a dataset with an answer column"
            )
        rows.append({"prompt": p, "answer": str(answer)})
    return rows


def _load_file(path: Path) -> Any:
    import datasets

    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InstructDataError(
            f"dataset file {str(path)!r}: unknown format {path.suffix!r}; use one of "
            f"{', '.join(FILE_FORMATS)}"
        )
    if fmt == "json" and path.suffix.lower() == ".jsonl":
        _check_jsonl(path)
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _check_jsonl(path: Path) -> None:
    """One JSON object a line (``datasets`` would report a parser error for a bad line)."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise InstructDataError(f"dataset {path}: line {i} is not JSON ({err})") from None
        if not isinstance(row, dict):
            raise InstructDataError(f"dataset {path}: line {i} is not a JSON object")


def load_rows_source(source: str, *, split: str = "train") -> Any:
    """A ``datasets.Dataset`` from a file, a ``save_to_disk`` directory or a hub id."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            ds = _load_file(path)
        elif path.is_dir() and any(
            (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InstructDataError(
                        f"dataset {source}: no split {split!r} (has {sorted(ds)})"
                    )
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except InstructDataError:
        raise
    except Exception as err:  # noqa: BLE001 - one line naming the source
        first = " ".join(str(err).split())[:300]
        raise InstructDataError(f"cannot load dataset {source!r}: {first}") from err
    if len(ds) == 0:
        raise InstructDataError(f"dataset {source!r} has no rows")
    return ds


def to_dataset(rows: Sequence[Mapping[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list([dict(r) for r in rows])


def held_out(ds: Any) -> tuple[Any, Any]:
    """``(train, eval)`` rows of a user dataset: ~10 % held out by a stable hash of the
    row, the rule of :func:`afm.lora.experiment.held_out_split`."""
    keys = [json.dumps(ds[i], sort_keys=True, default=str) for i in range(len(ds))]
    _, held = held_out_split([(k,) for k in keys])
    held_keys = {k for (k,) in held}
    eval_idx = [i for i, k in enumerate(keys) if k in held_keys]
    train_idx = [i for i, k in enumerate(keys) if k not in held_keys] or list(range(len(ds)))
    return ds.select(train_idx), ds.select(eval_idx)
