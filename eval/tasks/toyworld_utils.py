"""Dataset loaders for the bundled toy-world lm-eval tasks (``toyworld_*.yaml``).

The data files live next to this module in ``toyworld/`` and are regenerated
deterministically by ``scripts/make_toyworld_tasks.py`` from the toy world's
test split (``afm.toyworld``).  Paths are resolved relative to this file, so
the tasks run from any working directory, fully offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "toyworld"


def _load(name: str) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_DIR / f"{name}.jsonl")})


def load_arith(**kwargs: Any) -> Any:
    return _load("arith")


def load_facts(**kwargs: Any) -> Any:
    return _load("facts")


def load_ppl(**kwargs: Any) -> Any:
    return _load("ppl")
