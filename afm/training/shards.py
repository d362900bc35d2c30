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


def check_meta(out: Path, cfg: SyntheticDataConfig, model_name: str | None) -> None:
    meta_path = out / META
    meta = {"recipe": cfg.recipe(), "model": model_name, "format": 1}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("recipe") != meta["recipe"] or old.get("model") != model_name:
            raise DataError(
                f"{out} holds synthetic data made with a different recipe or model "
                f"({old.get('model')!r}); use another directory or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, meta_path) if not meta_path.exists() else tmp.unlink()
    except OSError:
        tmp.unlink(missing_ok=True)


def write_shard(
    out: Path,
    index: int,
    rows: list[list[int]],
    targets: list[dict[str, Any]] | None = None,
    spec: Any = None,
) -> None:
    """Write shard ``index``: ``input_ids`` and, with ``targets`` (one dict of per-position
    arrays per row, :mod:`afm.training.teacher_targets`), their flat target columns."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets.utils import logging as ds_logging

    columns: dict[str, Any] = {"input_ids": rows}
    features: dict[str, Any] = {"input_ids": Sequence(Value("int64"))}
    if targets is not None:
        from afm.training.teacher_targets import target_features

        features.update(target_features(spec))
        for c in spec.columns():
            columns[c] = [t[c].reshape(-1) for t in targets]

    final = out / shard_name(index)
    tmp = out / f".{shard_name(index)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        Dataset.from_dict(columns, features=Features(features)).save_to_disk(str(tmp))
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
        recipe = json.loads((d / META).read_text()).get("recipe", {})
        try:
            expected = SyntheticDataConfig(**recipe).num_shards
        except (TypeError, ValueError):
            expected = None
        if expected is not None and len(shards) < expected:
            raise DataError(
                f"data directory {str(d)!r} has {len(shards)} of {expected} shards; "
                "run afm-generate again to finish it"
            )
    parts = [load_from_disk(str(d / shard_name(i))) for i in shards]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if len(ds) == 0:
        raise DataError(f"data directory {str(d)!r} holds only empty shards")
    return ds
