"""Synthetic corpora on disk: Arrow shards written atomically, resumable, checked.

    out/
      meta.json            the generation recipe (a restarted run must match it)
      shard-00000/         Dataset.save_to_disk of {"input_ids": [[...], ...]}
      shard-00001/ ...
      stats.json           tokens, sequences, mean length (when all shards exist)

A shard is written to a temporary directory and renamed into place, so a killed run
never leaves a half shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from afm.training.data_config import DataError, SyntheticDataConfig
from afm.training.files import read_json, tmp_name

__all__ = [
    "META",
    "STATS",
    "check_meta",
    "complete_shards",
    "data_stats",
    "load_synthetic_data",
    "shard_name",
    "write_shard",
]

META = "meta.json"
STATS = "stats.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def complete_shards(out: Path) -> set[int]:
    done = set()
    for p in out.glob("shard-*"):
        if p.is_dir() and p.name[6:].isdigit() and (p / "dataset_info.json").exists():
            done.add(int(p.name[6:]))
    return done


def _ours(entry: Path) -> bool:
    """An entry a synthetic-data writer makes (shards, meta, stats, their temporaries)."""
    name = entry.name.lstrip(".")
    return name.startswith(("shard-", META, STATS))


def check_meta(
    out: Path, cfg: SyntheticDataConfig, model_name: str | None, *, write: bool = True
) -> None:
    """Refuse ``out`` if it holds data of another recipe or model, or files that are not
    synthetic data; with ``write``, record this recipe (``meta.json``) in a new one."""
    meta_path = out / META
    meta = {"recipe": cfg.recipe(), "model": model_name, "format": 1}
    if meta_path.exists():
        old = read_json(meta_path, "synthetic-data recipe")
        if not isinstance(old, dict) or (
            old.get("recipe") != meta["recipe"] or old.get("model") != model_name
        ):
            found = old.get("model") if isinstance(old, dict) else None
            raise DataError(
                f"{out} holds synthetic data made with a different recipe or model "
                f"({found!r}); use another directory or delete it"
            )
        return
    if out.is_dir():
        foreign = sorted(e.name for e in out.iterdir() if not _ours(e))
        if foreign:
            raise DataError(
                f"{str(out)!r} is not empty and holds no synthetic data (e.g. "
                f"{foreign[0]!r}); choose a new or empty directory"
            )
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(meta_path)
    tmp.write_text(json.dumps(meta, indent=2))
    try:  # two workers may race here: the first one's file stays
        os.replace(tmp, meta_path) if not meta_path.exists() else tmp.unlink()
    except OSError:
        tmp.unlink(missing_ok=True)


def write_shard(out: Path, index: int, rows: list[list[int]]) -> None:
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    final = out / shard_name(index)
    tmp = out / f".{shard_name(index)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp))
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    try:
        os.rename(tmp, final)  # atomic; fails if another worker already wrote it
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def data_stats(data_dir: str | Path) -> dict[str, Any]:
    """Tokens, sequences and mean length over the complete shards of ``data_dir``."""
    ds = load_synthetic_data(data_dir, require_complete=False)
    lengths = [len(x) for x in ds["input_ids"]]
    return {
        "shards": len(complete_shards(Path(data_dir))),
        "sequences": len(lengths),
        "tokens": int(sum(lengths)),
        "mean_length": (sum(lengths) / len(lengths)) if lengths else 0.0,
    }


def load_synthetic_data(data_dir: str | Path, *, require_complete: bool = True) -> Any:
    """The shards of ``data_dir`` as one ``datasets.Dataset`` (column ``input_ids``).

    Raises :class:`DataError` when the directory is missing, holds no shard, or
    (with ``require_complete``) lacks shards its ``meta.json`` promises.
    """
    from datasets import concatenate_datasets, load_from_disk

    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {str(d)!r} does not exist")
    shards = sorted(complete_shards(d))
    if not shards:
        raise DataError(f"data directory {str(d)!r} holds no shards (expected shard-00000/ ...)")
    if require_complete and (d / META).exists():
        meta = read_json(d / META, "synthetic-data recipe")
        try:
            expected = SyntheticDataConfig(**meta.get("recipe", {})).num_shards
        except (AttributeError, TypeError, ValueError):
            expected = None
        if expected is not None and len(shards) < expected:
            raise DataError(
                f"data directory {str(d)!r} has {len(shards)} of {expected} shards; "
                "run afm-generate again to finish it"
            )
    parts = [_load_shard(d / shard_name(i), load_from_disk) for i in shards]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds


def _load_shard(path: Path, load_from_disk: Any) -> Any:
    """One shard, or a :class:`DataError` naming it (damaged, empty, wrong column)."""
    state = path / "state.json"
    if state.exists() and read_json(state, "shard file").get("_data_files") == []:
        raise DataError(
            f"shard {str(path)!r} holds no sequences; delete it and run again to sample it"
        )
    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets / pyarrow raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"shard {str(path)!r} is damaged ({first}); delete it and run again to sample it anew"
        ) from None
    if "input_ids" not in ds.column_names:
        raise DataError(f"shard {str(path)!r} has no 'input_ids' column")
    if len(ds) == 0:
        raise DataError(
            f"shard {str(path)!r} holds no sequences; delete it and run again to sample it"
        )
    return ds
