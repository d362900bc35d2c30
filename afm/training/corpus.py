"""The user's own corpus as training rows: read, tokenized with the teacher's tokenizer,
packed into ``seq_len`` rows, written as shards (:mod:`afm.training.shards`).

    prepare_corpus(CorpusConfig(path="my.jsonl"), tokenizer, "runs/x/corpus", seq_len=512)
    rows = load_corpus("runs/x/corpus")  # a datasets.Dataset of input_ids

Sources (``corpus.path``): a ``datasets.save_to_disk`` directory (a dataset or a dataset
dict, ``corpus.split``), a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file, a
directory or glob of such files (``.txt``: one document per line), else a hub dataset id
(``corpus.name``, ``corpus.split``; ``corpus.streaming`` streams it).  Local files are
read as a stream, and the packed rows are written shard by shard, so a corpus never has
to fit in memory.

Each document is the ``text_column`` string, or the ``messages_column`` chat rendered with
the tokenizer's chat template; it is tokenized with the tokenizer's special tokens (BOS),
ended with EOS (``add_eos``), and documents are packed back to back into full
``seq_len`` rows; the last partial row is dropped (and counted).
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from afm.training.data_config import CorpusConfig, DataError
from afm.training.shards import META, STATS, load_rows, write_index, write_shard

__all__ = ["check_corpus", "load_corpus", "mix_rows", "pack", "prepare_corpus", "read_documents"]

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_TOKENIZE_BATCH = 256


def _local_files(path: str) -> list[str]:
    """The data files ``path`` names (a file, a directory of files or a glob)."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix in _BUILDERS)
    return sorted(glob.glob(path)) if any(c in path for c in "*?[") else []


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any(
        (p / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def _from_disk(p: Path, split: str) -> Any:
    from datasets import load_from_disk

    ds = load_from_disk(str(p))
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise DataError(
                f"corpus.split={split!r} is not a split of {str(p)!r} "
                f"(splits: {', '.join(ds.keys())})"
            )
        ds = ds[split]
    return ds


def read_documents(cfg: CorpusConfig) -> Any:
    """The corpus of ``cfg`` as a ``datasets`` (Iterable)Dataset of documents."""
    from datasets import load_dataset

    path = str(cfg.path)
    if _is_saved_dataset(Path(path)):
        return _from_disk(Path(path), cfg.split)
    files = _local_files(path)
    if files:
        kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(
                f"corpus.path={path!r}: files must all be one of .jsonl/.json, .parquet or "
                f".txt (found {', '.join(sorted({Path(f).suffix or '?' for f in files}))})"
            )
        return load_dataset(kinds.pop(), data_files=files, split="train", streaming=True)
    if Path(path).exists():
        raise DataError(f"corpus.path={path!r} holds no .jsonl/.json/.parquet/.txt file")
    try:  # a hub dataset id, for users who have the hub
        return load_dataset(path, cfg.name, split=cfg.split, streaming=cfg.streaming)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; name the key
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"corpus.path={path!r} is neither a local file/directory nor a loadable hub "
            f"dataset: {first}"
        ) from None


def _texts(batch: dict[str, list[Any]], cfg: CorpusConfig, tokenizer: Any) -> list[str]:
    column = cfg.messages_column or cfg.text_column
    if column not in batch:
        raise DataError(
            f"corpus.{'messages_column' if cfg.messages_column else 'text_column'}="
            f"{column!r} is not a column of {cfg.path!r} (columns: {', '.join(batch)})"
        )
    values = batch[column]
    if cfg.messages_column is None:
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(
                f"corpus.text_column={column!r} holds {type(bad).__name__} values, not text"
                " (chat messages: set corpus.messages_column)"
            )
        return values
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"corpus.messages_column={column!r} needs a tokenizer with a chat template; "
            "the teacher's tokenizer has none"
        )
    return [tokenizer.apply_chat_template(m, tokenize=False) for m in values]


def check_corpus(cfg: CorpusConfig, tokenizer: Any) -> None:
    """Read the first documents of ``cfg``: a bad path, split or column raises
    :class:`DataError` before a run writes anything."""
    for batch in read_documents(cfg).iter(batch_size=8):
        _texts(batch, cfg, tokenizer)
        return
    raise DataError(f"corpus.path={cfg.path!r} holds no documents")


def _token_lists(docs: Any, cfg: CorpusConfig, tokenizer: Any) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id if cfg.add_eos else None
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
    special = cfg.messages_column is None
    for batch in docs.iter(batch_size=_TOKENIZE_BATCH):
        texts = _texts(batch, cfg, tokenizer)
        for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            if ids:
                yield ids


def pack(docs: Iterable[list[int]], seq_len: int, counts: dict[str, int]) -> Iterator[list[int]]:
    """Documents back to back, cut into full ``seq_len`` rows; ``counts`` gets
    ``documents`` and ``dropped_tokens`` (the last partial row)."""
    buffer: list[int] = []
    for ids in docs:
        counts["documents"] = counts.get("documents", 0) + 1
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    counts["dropped_tokens"] = len(buffer)


def _meta(cfg: CorpusConfig, seq_len: int, tokenizer_name: str | None) -> dict[str, Any]:
    return {
        "kind": "corpus",
        "recipe": cfg.recipe(),
        "seq_len": seq_len,
        "tokenizer": tokenizer_name,
    }


def prepare_corpus(
    cfg: CorpusConfig,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    seq_len: int,
    tokenizer_name: str | None = None,
) -> dict[str, Any]:
    """Pack the corpus of ``cfg`` into ``out_dir`` (reused when it holds the same recipe,
    refused when it holds another); returns the stats (also ``stats.json``)."""
    out = Path(out_dir)
    meta = _meta(cfg, seq_len, tokenizer_name)
    if (out / STATS).is_file():
        old = json.loads((out / META).read_text()) if (out / META).is_file() else None
        if old != meta:
            raise DataError(
                f"{str(out)!r} holds a corpus packed with another recipe or tokenizer; "
                "use another output directory or delete it"
            )
        return json.loads((out / STATS).read_text())
    if out.exists():
        shutil.rmtree(out)  # an interrupted packing: packing again is cheap
    out.mkdir(parents=True)
    (out / META).write_text(json.dumps(meta, indent=2))
    counts: dict[str, int] = {}
    rows: list[list[int]] = []
    shards, tokens = 0, 0
    docs = _token_lists(read_documents(cfg), cfg, tokenizer)
    for row in pack(docs, seq_len, counts):
        rows.append(row)
        tokens += seq_len
        if len(rows) == cfg.rows_per_shard:
            write_shard(out, shards, rows)
            shards, rows = shards + 1, []
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            break
    if rows:
        write_shard(out, shards, rows)
        shards += 1
    if shards == 0:
        raise DataError(
            f"corpus.path={cfg.path!r} yields no full row of data.seq_len={seq_len} tokens "
            f"({counts.get('documents', 0)} documents, {counts.get('dropped_tokens', 0)} tokens)"
        )
    write_index(out)
    stats = {
        "documents": counts.get("documents", 0),
        "sequences": tokens // seq_len,
        "tokens": tokens,
        "dropped_tokens": counts.get("dropped_tokens", 0),
        "shards": shards,
    }
    (out / STATS).write_text(json.dumps(stats, indent=2))
    logger.info(
        "packed corpus %s: %d documents into %d rows of %d tokens (%s)",
        cfg.path,
        stats["documents"],
        stats["sequences"],
        seq_len,
        out,
    )
    return stats


def load_corpus(out_dir: str | Path) -> Any:
    """The packed rows of :func:`prepare_corpus` (a ``datasets.Dataset``)."""
    if not (Path(out_dir) / STATS).is_file():
        raise DataError(f"{str(out_dir)!r} holds no packed corpus (run prepare_corpus first)")
    return load_rows(out_dir)


def mix_rows(corpus: Any, synthetic: Any, mix: float) -> Any:
    """``corpus`` and ``synthetic`` rows at the ratio ``mix`` : ``1 - mix``: the largest
    mixture both can supply, the first rows of each (the training order is shuffled)."""
    from datasets import concatenate_datasets

    if mix >= 1.0:
        return corpus
    total = min(int(len(corpus) / mix), int(len(synthetic) / (1.0 - mix)))
    n_corpus = round(total * mix)
    n_synth = total - n_corpus
    if n_corpus < 1 or n_synth < 1:
        raise DataError(
            f"corpus.mix={mix} cannot be met with {len(corpus)} corpus rows and "
            f"{len(synthetic)} synthetic rows"
        )
    logger.info(
        "training rows: %d from the corpus + %d teacher-generated (corpus.mix=%s; %d corpus "
        "and %d generated rows available)",
        n_corpus,
        n_synth,
        mix,
        len(corpus),
        len(synthetic),
    )
    return concatenate_datasets([corpus.select(range(n_corpus)), synthetic.select(range(n_synth))])
