"""Synthetic training data sampled from the FP teacher (the AFM paper's method).

Sequences are sampled unconditionally from BOS (or from the lines of a prompts
file) and written as Arrow shards with ``datasets``::

    out/
      meta.json            the generation config (a restarted run must match it)
      shard-00000/         Dataset.save_to_disk of {"input_ids": [[...], ...]}
      shard-00001/ ...
      stats.json           tokens, sequences, mean length (when all shards exist)

Shard ``i`` is generated with seed ``shard_seed(seed, i)`` in fixed batches, so
its content does not depend on how many workers run or in which order.  A
shard is written to a temporary directory and renamed into place, so a killed
run never leaves a half shard: a restart generates exactly the missing shards.
Under ``torchrun`` / ``accelerate launch`` rank ``r`` of ``w`` generates the
shards ``i ≡ r (mod w)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "SyntheticDataConfig",
    "generate_synthetic_data",
    "load_synthetic_data",
    "shard_seed",
    "data_stats",
    "pad_collate",
]

META = "meta.json"
STATS = "stats.json"
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
            raise ValueError(f"data.{name}={getattr(self, name)!r} is invalid: {why}")

        for name in ("num_tokens", "seq_len", "sequences_per_shard", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive int")
        if self.seq_len < 2:
            bad("seq_len", "must be >= 2")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad("top_k", "must be a positive int or None")
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            bad("top_p", "must be in (0, 1] or None")
        if self.eos not in _EOS_MODES:
            bad("eos", f"must be one of {_EOS_MODES}")
        if self.backend not in _BACKENDS:
            bad("backend", f"must be one of {_BACKENDS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "must be an int")

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
    h = hashlib.sha256(f"afm-shard:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --------------------------------------------------------------------------- sampling


def _read_prompts(path: str, tokenizer: Any) -> list[list[int]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompts file {path!r} does not exist")
    lines = [ln.rstrip("\n") for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise DataError(f"prompts file {path!r} holds no prompts")
    return [_with_bos(tokenizer(ln, add_special_tokens=False).input_ids, tokenizer) for ln in lines]


def _with_bos(ids: list[int], tokenizer: Any) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        return [bos, *ids]
    return list(ids)


def _bos_prompt(tokenizer: Any) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start sampling")
    return [bos]


def _hf_sample(
    model: Any,
    prompts: Sequence[list[int]],
    max_new: int,
    cfg: SyntheticDataConfig,
    pad_id: int,
    eos_id: int | None,
) -> list[list[int]]:
    """One batched ``generate`` call with left padding; returns prompt + continuation."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if cfg.temperature == 0:
        kwargs["do_sample"] = False
    else:
        # Explicit values: the model's generation_config defaults must not leak in.
        kwargs.update(
            do_sample=True,
            temperature=float(cfg.temperature),
            top_k=cfg.top_k or 0,
            top_p=float(cfg.top_p) if cfg.top_p is not None else 1.0,
        )
    if cfg.eos == "pack" and eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    else:
        kwargs["eos_token_id"] = None  # never stop early
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
        ).cpu()
    seqs = []
    for r, p in enumerate(prompts):
        row = out[r, width - len(p) :].tolist()
        if cfg.eos == "pack" and eos_id is not None:
            gen = row[len(p) :]
            if eos_id in gen:
                gen = gen[: gen.index(eos_id) + 1]
            else:
                gen = [t for t in gen if t != pad_id]
            row = row[: len(p)] + gen
        seqs.append(row)
    return seqs


def _vllm_sample(
    llm: Any, prompts: Sequence[list[int]], max_new: int, cfg: SyntheticDataConfig, seed: int
) -> list[list[int]]:
    from vllm import SamplingParams  # optional extra

    params = SamplingParams(
        n=1,
        temperature=float(cfg.temperature),
        top_k=cfg.top_k or -1,
        top_p=cfg.top_p or 1.0,
        max_tokens=max_new,
        ignore_eos=cfg.eos == "ignore",
        seed=seed,
    )
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs, strict=True)]


def _resolve_backend(cfg: SyntheticDataConfig) -> str:
    if cfg.backend == "hf":
        return "hf"
    try:
        import vllm  # noqa: F401

        have_vllm = True
    except ImportError:
        have_vllm = False
    if cfg.backend == "vllm":
        if not have_vllm or not torch.cuda.is_available():
            raise RuntimeError(
                "data.backend='vllm' needs vLLM and a CUDA GPU: pip install vllm "
                "(or use data.backend='hf')"
            )
        return "vllm"
    return "vllm" if have_vllm and torch.cuda.is_available() else "hf"


def _generate_shard(
    index: int,
    model: Any,
    tokenizer: Any,
    cfg: SyntheticDataConfig,
    prompts: list[list[int]] | None,
    backend: str,
    llm: Any = None,
    progress: Any = None,
) -> list[list[int]]:
    seed = shard_seed(cfg.seed, index)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    n = cfg.sequences_per_shard
    rows: list[list[int]] = []
    buffer: list[int] = []
    call = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(rows) < n:
            want = min(cfg.batch_size, n - len(rows)) if cfg.eos == "ignore" else cfg.batch_size
            if prompts is None:
                batch_prompts = [_bos_prompt(tokenizer)] * want
            else:
                start = (index * n + call * cfg.batch_size) % len(prompts)
                batch_prompts = [prompts[(start + k) % len(prompts)] for k in range(want)]
            width = max(len(p) for p in batch_prompts)
            max_new = max(1, cfg.seq_len - width)
            if backend == "vllm":
                seqs = _vllm_sample(llm, batch_prompts, max_new, cfg, seed + call)
            else:
                seqs = _hf_sample(model, batch_prompts, max_new, cfg, pad_id, eos_id)
            call += 1
            if cfg.eos == "ignore":
                new = [s[: cfg.seq_len] for s in seqs]
                rows.extend(new)
                if progress is not None:
                    progress.update(sum(len(s) for s in new))
            else:  # stop-and-pack: documents back to back, cut into full rows
                before = len(rows)
                for s in seqs:
                    buffer.extend(s)
                    while len(buffer) >= cfg.seq_len and len(rows) < n:
                        rows.append(buffer[: cfg.seq_len])
                        buffer = buffer[cfg.seq_len :]
                if progress is not None:
                    progress.update((len(rows) - before) * cfg.seq_len)
                if call > 1000 * max(1, n // cfg.batch_size):
                    raise RuntimeError("stop-and-pack made no progress (empty documents?)")
    return rows[:n]


# --------------------------------------------------------------------------- shards on disk


def _complete_shards(out: Path) -> set[int]:
    done = set()
    for p in out.glob("shard-*"):
        if p.is_dir() and p.name[6:].isdigit() and (p / "dataset_info.json").exists():
            done.add(int(p.name[6:]))
    return done


def _check_meta(out: Path, cfg: SyntheticDataConfig, model_name: str | None) -> None:
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


def _write_shard(out: Path, index: int, rows: list[list[int]]) -> None:
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    final = out / _shard_name(index)
    tmp = out / f".{_shard_name(index)}.tmp-{os.getpid()}"
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
        "shards": len(_complete_shards(Path(data_dir))),
        "sequences": len(lengths),
        "tokens": int(sum(lengths)),
        "mean_length": (sum(lengths) / len(lengths)) if lengths else 0.0,
    }


def generate_synthetic_data(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    config: SyntheticDataConfig = SyntheticDataConfig(),
    *,
    model_name: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample the corpus into ``out_dir`` (resumable; see the module docstring).

    Args:
        model: the FP teacher (``generate``-capable HF causal LM); set to eval mode.
        tokenizer: its tokenizer (BOS starts every unconditional sample).
        out_dir: shard directory; existing complete shards are kept and skipped.
        config: the sampling recipe.
        model_name: recorded in ``meta.json``; a directory made from another model
            or recipe raises :class:`DataError` instead of being mixed.
        rank, world_size: this worker's share (default: torch.distributed or the
            ``RANK`` / ``WORLD_SIZE`` environment); shards ``i ≡ rank (mod world)``.
        max_shards: stop after generating this many new shards (for tests / time slicing).

    Returns:
        stats: ``shards``, ``sequences``, ``tokens``, ``mean_length`` over the complete
        shards, ``complete`` (all shards present), ``generated`` (new shards by this
        worker) and ``tokens_per_s``; also written to ``stats.json`` once complete.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    r0, w0 = _dist_info()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    _check_meta(out, config, model_name)
    prompts = _read_prompts(config.prompts_file, tokenizer) if config.prompts_file else None
    backend = _resolve_backend(config)
    todo = [
        i
        for i in range(config.num_shards)
        if i % world_size == rank and i not in _complete_shards(out)
    ]
    if max_shards is not None:
        todo = todo[:max_shards]
    llm = None
    if todo and backend == "vllm":
        from vllm import LLM

        llm = LLM(model=model_name or model.name_or_path, seed=config.seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(
        total=len(todo) * config.sequences_per_shard * config.seq_len,
        unit="tok",
        unit_scale=True,
        desc=f"sampling synthetic data (rank {rank})" if world_size > 1 else "sampling",
        disable=not progress or not todo,
    )
    try:
        for i in todo:
            rows = _generate_shard(i, model, tokenizer, config, prompts, backend, llm, bar)
            _write_shard(out, i, rows)
            tokens += sum(len(r) for r in rows)
            logger.info("wrote %s (%d sequences)", _shard_name(i), len(rows))
    finally:
        bar.close()
        model.train(was_training)
    elapsed = time.perf_counter() - t0
    stats = data_stats(out)
    stats.update(
        complete=stats["shards"] == config.num_shards,
        expected_shards=config.num_shards,
        generated=len(todo),
        tokens_per_s=tokens / elapsed if elapsed > 0 and tokens else 0.0,
    )
    if stats["complete"]:
        tmp = out / f".{STATS}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, out / STATS)
    return stats


def load_synthetic_data(data_dir: str | Path, *, require_complete: bool = True) -> Any:
    """The shards of ``data_dir`` as one ``datasets.Dataset`` (column ``input_ids``).

    Raises :class:`DataError` when the directory is missing, holds no shard, or
    (with ``require_complete``) lacks shards its ``meta.json`` promises.
    """
    from datasets import concatenate_datasets, load_from_disk

    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {str(d)!r} does not exist")
    shards = sorted(_complete_shards(d))
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
    parts = [load_from_disk(str(d / _shard_name(i))) for i in shards]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if len(ds) == 0:
        raise DataError(f"data directory {str(d)!r} holds only empty shards")
    return ds


def pad_collate(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into ``input_ids`` / ``attention_mask`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}
