"""Token rows on disk (synthetic corpora, packed user corpora): Arrow shards written
atomically, resumable, checked, and readable by ``datasets`` as one dataset.

    out/
      meta.json            the recipe (a restarted run must match it)
      shard-00000/         Dataset.save_to_disk of {"input_ids": [[...], ...]}
      shard-00001/ ...
      stats.json           tokens, sequences, mean length (when all shards exist)
      state.json, dataset_info.json, README.md
                           the index (when all shards exist): ``datasets.load_from_disk(out)``
                           reads every shard as one ``train`` dataset, memory-mapped
                           (``datasets.load_dataset(out)`` then says to use load_from_disk,
                           as for any save_to_disk directory)

A shard is written to a temporary directory and renamed into place, so a killed run
never leaves a half shard.  Directories written before the index existed (format 1)
stay readable by :func:`load_synthetic_data`; :func:`write_index` makes them
datasets-native (``afm-generate`` on them again does it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from afm.training.data_config import DataError, SyntheticDataConfig
from afm.training.files import read_json, tmp_name

__all__ = [
    "META",
    "STATS",
    "check_meta",
    "complete_shards",
    "data_stats",
    "load_rows",
    "load_synthetic_data",
    "shard_name",
    "write_index",
    "write_shard",
]

META = "meta.json"
STATS = "stats.json"
_STATE, _INFO, _CARD = "state.json", "dataset_info.json", "README.md"
_CARD_TEXT = """# Token rows written by afm

One row per training sequence (column `input_ids`), in `shard-*/`; `meta.json` holds the
recipe, `stats.json` the counts.  Read them as one dataset with
`datasets.load_from_disk(dir)`.
"""


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


def write_shard(
    out: Path,
    index: int,
    rows: list[list[int]],
    targets: list[dict[str, Any]] | None = None,
    spec: Any = None,
) -> None:
    """Write shard ``index``: ``input_ids`` and, with ``targets`` (one dict of per-position
    arrays per row, :mod:`afm.training.teacher_targets`), their flat target columns."""
    from datasets import Dataset, Features
    from datasets.utils import logging as ds_logging

    columns: dict[str, Any] = {"input_ids": rows}
    features: dict[str, Any] = dict(_features())  # the same in every shard
    if targets is not None:
        from afm.training.teacher_targets import target_features

        features.update(target_features(spec))
        for c in spec.columns():
            columns[c] = _flat_list_array([t[c].reshape(-1) for t in targets])

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


def _flat_list_array(rows: list[Any]) -> Any:
    """One Arrow list array over per-row numpy arrays, built from one concatenation and
    its offsets (what ``datasets`` makes of a list of arrays, ~15x faster)."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    if offsets[-1] >= 2**31:  # list<...> offsets are int32
        raise DataError(f"a shard's target column holds {offsets[-1]} values (max 2**31 - 1); "
                         "lower data.sequences_per_shard")  # fmt: skip
    values = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32"))})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_index(out: str | Path) -> None:
    """Write the index (``state.json``, ``dataset_info.json``, ``README.md``) over the
    complete shards of ``out``, so that ``datasets`` reads them as one dataset."""
    d = Path(out)
    shards = sorted(complete_shards(d))
    if not shards:
        raise DataError(f"data directory {str(d)!r} holds no shards to index")
    files = []
    for i in shards:
        part = json.loads((d / shard_name(i) / _STATE).read_text())
        files += [{"filename": f"{shard_name(i)}/{f['filename']}"} for f in part["_data_files"]]
    state = json.loads((d / shard_name(shards[0]) / _STATE).read_text())
    state.update(
        _data_files=files,
        _fingerprint=hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16],
        _split="train",
    )
    _write_atomic(d / _INFO, (d / shard_name(shards[0]) / _INFO).read_text())
    _write_atomic(d / _STATE, json.dumps(state, indent=2))
    _write_atomic(d / _CARD, _CARD_TEXT)


def _index_is_current(d: Path, shards: list[int]) -> bool:
    if not ((d / _STATE).is_file() and (d / _INFO).is_file()):
        return False
    files = json.loads((d / _STATE).read_text()).get("_data_files", [])
    return {f["filename"].split("/")[0] for f in files} == {shard_name(i) for i in shards}


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


def load_rows(data_dir: str | Path) -> Any:
    """The token rows of ``data_dir`` as one ``datasets.Dataset`` (column ``input_ids`` and
    the cached teacher-target columns it holds, :mod:`afm.training.teacher_targets`):
    an afm shard directory (indexed or format 1), or any ``save_to_disk`` dataset (or
    dataset dict with a ``train`` split) that has an ``input_ids`` column.

    Raises :class:`DataError` when the directory is missing, holds no rows or no
    ``input_ids`` column (texts belong in ``corpus.path``, which tokenizes them).
    """
    from datasets import concatenate_datasets, load_from_disk

    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {str(d)!r} does not exist")
    shards = sorted(complete_shards(d))
    ds = None
    if shards and _index_is_current(d, shards):
        try:
            ds = load_from_disk(str(d))
        except Exception:  # noqa: BLE001 - a damaged shard: found and named one by one below
            ds = None
    if shards and ds is None:
        parts = [_load_shard(d / shard_name(i), load_from_disk) for i in shards]
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    elif not shards and ((d / _STATE).is_file() or (d / "dataset_dict.json").is_file()):
        ds = load_from_disk(str(d))
        if hasattr(ds, "keys"):  # a DatasetDict
            if "train" not in ds:
                raise DataError(
                    f"data directory {str(d)!r} is a dataset dict without a 'train' split "
                    f"(splits: {', '.join(ds.keys())})"
                )
            ds = ds["train"]
    elif ds is None:
        raise DataError(
            f"data directory {str(d)!r} holds no shards (expected shard-00000/ ... or a "
            "datasets.save_to_disk directory)"
        )
    if "input_ids" not in ds.column_names:
        raise DataError(
            f"data directory {str(d)!r} has no 'input_ids' column (columns: "
            f"{', '.join(ds.column_names)}); to train on texts set corpus.path={str(d)!r} "
            "(tokenized and packed with the teacher's tokenizer)"
        )
    if len(ds) == 0:
        raise DataError(f"data directory {str(d)!r} holds only empty shards")
    from afm.training.teacher_targets import COLUMNS  # cached teacher targets, if any

    return ds.select_columns(["input_ids", *(c for c in ds.column_names if c in COLUMNS)])


def load_synthetic_data(data_dir: str | Path, *, require_complete: bool = True) -> Any:
    """The rows of ``data_dir`` (:func:`load_rows`) as one ``datasets.Dataset``.

    Raises :class:`DataError` when the directory is missing, holds no rows, or
    (with ``require_complete``) lacks shards its ``meta.json`` promises.
    """
    d = Path(data_dir)
    shards = sorted(complete_shards(d)) if d.is_dir() else []
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
    return load_rows(d)


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
