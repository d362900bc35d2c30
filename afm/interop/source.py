"""Where an IBM analog foundation model's files are: a local directory or a hub id.

The layout (IBM/analog-foundation-models ``example.py``): ``config.json``, the
``rpu_config`` pickle, the state dict as ``pytorch_model.bin`` or as shards
``pytorch_model-0000N-of-0000M.bin`` (with or without
``pytorch_model.bin.index.json``), tokenizer files.  A safetensors copy of the state
dict (``model.safetensors``, shards + index) is read instead of the pickles when
present.  From a hub id only these files are downloaded
(``huggingface_hub.snapshot_download`` with ``allow_patterns``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from afm.export.int4 import TOKENIZER_FILES

logger = logging.getLogger(__name__)

__all__ = ["HUB_PATTERNS", "MissingFilesError", "SourceFiles", "find_source_files", "fetch"]

RPU_CONFIG = "rpu_config"
_EXPECTED = (
    "config.json, rpu_config and the state dict (pytorch_model.bin, or "
    "pytorch_model-0000N-of-0000M.bin shards with pytorch_model.bin.index.json)"
)

#: Tokenizer and generation files copied next to the imported model, byte for byte.
TOKENIZER_PATTERNS = (*TOKENIZER_FILES, "generation_config.json")
#: What is downloaded from the hub (nothing else: no code, no other weights).
HUB_PATTERNS = (
    "config.json",
    RPU_CONFIG,
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_PATTERNS,
)


class MissingFilesError(OSError):
    """The source lacks files the import needs (the message names them)."""


@dataclass(frozen=True)
class SourceFiles:
    directory: Path
    config: Path
    rpu_config: Path
    weights: tuple[Path, ...]
    """State-dict files, in shard order."""

    def tokenizer_files(self) -> list[Path]:
        found = {p for pat in TOKENIZER_PATTERNS for p in self.directory.glob(pat) if p.is_file()}
        return sorted(found)


def _indexed(directory: Path, index: Path) -> tuple[list[Path], list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{index}: not a valid shard index ({type(err).__name__}: {err})"
        ) from None
    if not names or not all(isinstance(n, str) and "/" not in n for n in names):
        raise ValueError(f"{index}: weight_map must name shard files in the same directory")
    return [directory / n for n in names], [n for n in names if not (directory / n).is_file()]


def _shards(directory: Path, stem: str, ext: str) -> tuple[list[Path], list[str]]:
    """``stem-0000N-of-0000M.ext`` files: all M of them, or the names of those missing."""
    pattern = re.compile(rf"{re.escape(stem)}-(\d+)-of-(\d+)\.{ext}")
    totals = {m.group(2) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))}
    if len(totals) != 1:
        return [], ([] if not totals else [f"one shard count (found -of-{sorted(totals)})"])
    total = totals.pop()
    names = [f"{stem}-{i:0{len(total)}d}-of-{total}.{ext}" for i in range(1, int(total) + 1)]
    return [directory / n for n in names], [n for n in names if not (directory / n).is_file()]


def _weights(directory: Path) -> tuple[list[Path], list[str]]:
    """The state-dict files (safetensors preferred) or what is missing of them."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = directory / f"{stem}.{ext}.index.json"
        if index.is_file():
            return _indexed(directory, index)
        single = directory / f"{stem}.{ext}"
        if single.is_file():
            return [single], []
        files, missing = _shards(directory, stem, ext)
        if files or missing:
            return files, missing
    return [], ["pytorch_model.bin (or pytorch_model-0000N-of-0000M.bin shards)"]


def find_source_files(directory: str | Path) -> SourceFiles:
    """The files of the model in ``directory``; one error naming every missing file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFilesError(
            f"{str(directory)!r} is not a directory; afm-import needs {_EXPECTED}"
        )
    missing = [n for n in ("config.json", RPU_CONFIG) if not (directory / n).is_file()]
    weights, missing_weights = _weights(directory)
    missing += missing_weights
    if missing:
        raise MissingFilesError(
            f"{str(directory)!r} is missing {', '.join(missing)}; afm-import needs {_EXPECTED}"
        )
    return SourceFiles(directory, directory / "config.json", directory / RPU_CONFIG, tuple(weights))


def fetch(source: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is, or a hub id downloaded (only :data:`HUB_PATTERNS`)."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for hub ids; {str(path)!r} is a directory")
        return path
    if path.exists():
        raise MissingFilesError(f"{str(path)!r} is a file; pass the directory of the model")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(source), revision=revision, allow_patterns=list(HUB_PATTERNS))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise MissingFilesError(
            f"{str(source)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(err).__name__}: {reason}); missing: {_EXPECTED}. "
            "Download them into a directory and pass its path"
        ) from None
    logger.info("afm-import: %s fetched to %s", source, local)
    return Path(local)
