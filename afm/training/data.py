"""Synthetic training data sampled from the FP teacher (the AFM paper's method).

Sequences are sampled unconditionally from BOS (or from the lines of a prompts
file) and written as Arrow shards (:mod:`afm.training.shards`).

Shard ``i`` is generated with seed ``shard_seed(seed, i)`` in fixed batches, so
its content does not depend on how many workers run or in which order.  A
shard is written to a temporary directory and renamed into place, so a killed
run never leaves a half shard: a restart generates exactly the missing shards.
Under ``torchrun`` / ``accelerate launch`` rank ``r`` of ``w`` generates the
shards ``i ≡ r (mod w)``.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afm.seeds import derive_seed
from afm.training.data_checks import check_seq_len, resolve_backend
from afm.training.data_config import DataError, SyntheticDataConfig, shard_seed
from afm.training.files import remove_orphans, write_json_atomic
from afm.training.shards import (
    META,
    STATS,
    check_meta,
    complete_shards,
    data_stats,
    shard_name,
    write_index,
    write_shard,
)
from afm.training.teacher_targets import (
    TargetRecorder,
    TargetSpec,
    concat_targets,
    missing_targets,
    row_targets,
)
from afm.validation import check_device, check_output_path, check_safetensors_files

logger = logging.getLogger(__name__)

__all__ = ["generate_for_model", "generate_synthetic_data", "read_prompts", "sampling_backend"]


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --------------------------------------------------------------------------- sampling


def read_prompts(path: str, tokenizer: Any) -> list[list[int]]:
    """The lines of a prompts file as token ids, BOS first (empty lines skipped)."""
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
    spec: TargetSpec | None = None,
    target_gen: torch.Generator | None = None,
) -> tuple[list[list[int]], list[dict] | None]:
    """One batched ``generate`` call with left padding; returns prompt + continuation
    and, with ``spec``, each row's per-position sparse teacher targets."""
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
    recorder = TargetRecorder(model, spec, target_gen) if spec is not None else nullcontext()
    with torch.no_grad(), recorder:
        if spec is None:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        else:
            out = _generate_with_last_target(model, ids.to(device), mask.to(device), kwargs)
    out = out.cpu()
    steps = recorder.arrays() if spec is not None else {}
    seqs, targets = [], [] if spec is not None else None
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
        if spec is not None:
            targets.append(row_targets(steps, r, len(p), len(row), spec))
    return seqs, targets


def _generate_with_last_target(model: Any, ids: Any, mask: Any, kwargs: dict) -> Any:
    """``generate``, then one decoding step more on its cache: that step's logits are the
    last token's target.  No token is sampled from it, so the random stream (and every
    later batch of the shard) is the same as without targets."""
    res = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    seqs = res.sequences
    full = torch.ones(seqs.shape, dtype=mask.dtype, device=mask.device)
    full[:, : mask.shape[1]] = mask
    # transformers >= 5.2x names the cache ``cache``; older versions ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(res, "cache", None) if name == "cache" else res.past_key_values
    model(
        input_ids=seqs[:, -1:],
        attention_mask=full,
        position_ids=full.sum(-1, keepdim=True) - 1,  # left padding: count real tokens
        use_cache=True,
        **{name: cache},
    )
    return seqs


def _vllm_sample(
    llm: Any,
    prompts: Sequence[list[int]],
    max_new: int,
    cfg: SyntheticDataConfig,
    seed: int,
    spec: TargetSpec | None = None,
) -> tuple[list[list[int]], list[dict] | None]:
    from vllm import SamplingParams  # optional extra

    params = SamplingParams(
        n=1,
        temperature=float(cfg.temperature),
        top_k=cfg.top_k or -1,
        top_p=cfg.top_p or 1.0,
        max_tokens=max_new + (spec is not None),  # one more: the last kept token's target
        ignore_eos=cfg.eos == "ignore",
        seed=seed,
        logprobs=spec.k if spec is not None else None,
    )
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    seqs, targets = [], [] if spec is not None else None
    for p, o in zip(prompts, outs, strict=True):
        gen = list(o.outputs[0].token_ids)[:max_new]
        seqs.append(list(p) + gen)
        if spec is not None:
            if not o.outputs[0].logprobs:  # never store "no target" where one was asked for
                raise DataError(f"vLLM returned no logprobs for a sequence although "
                                f"data.targets={cfg.targets!r} asked for them")  # fmt: skip
            per_step = [_vllm_top_k(step, spec.k) for step in o.outputs[0].logprobs]
            # [steps, 1, k]: the layout TargetRecorder.arrays gives row_targets
            steps = {c: np.stack([t[c] for t in per_step]) for c in spec.columns()}
            targets.append(row_targets(steps, 0, len(p), len(seqs[-1]), spec))
    return seqs, targets


def _vllm_top_k(step: dict[int, Any], k: int) -> dict[str, np.ndarray]:
    """The ``k`` largest of one step's ``{token id: Logprob}`` (vLLM adds the sampled
    token to the top ``k``), as one row of ``top_k`` targets."""
    if len(step) < k:
        raise DataError(f"vLLM returned {len(step)} logprobs for a position, fewer than "
                        f"data.targets_k={k}")  # fmt: skip
    best = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:k]
    return {
        "top_k_ids": np.array([[t for t, _ in best]], np.int32),
        "top_k_logprobs": np.array([[lp.logprob for _, lp in best]], np.float16),
    }


def sampling_backend(cfg: SyntheticDataConfig) -> str:
    """``data_checks.resolve_backend``, and transformers where the targets need draws
    from the full distribution (vLLM returns top-k logprobs only)."""
    sampled = "sampled" in cfg.target_forms
    if cfg.backend == "vllm" and sampled:
        raise DataError(
            f"data.targets={cfg.targets!r} needs data.backend='hf': vLLM returns top-k "
            "logprobs only (use data.targets='top_k' with vLLM)"
        )
    backend = resolve_backend(cfg)
    if backend == "vllm" and sampled:
        logger.warning("data.targets=%r: sampling with transformers (vLLM returns top-k "
                       "logprobs only)", cfg.targets)  # fmt: skip
        return "hf"
    return backend


def _generate_shard(
    index: int,
    model: Any,
    tokenizer: Any,
    cfg: SyntheticDataConfig,
    prompts: list[list[int]] | None,
    backend: str,
    llm: Any = None,
    progress: Any = None,
) -> tuple[list[list[int]], list[dict] | None]:
    """Shard ``index``: its rows and, with ``data.targets``, each row's sparse targets."""
    seed = shard_seed(cfg.seed, index)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    spec = TargetSpec.from_config(cfg) if cfg.target_forms else None
    target_gen = None
    if spec is not None and "sampled" in spec.forms:
        # Its own stream: the tokens stay those of a run without targets.
        target_gen = torch.Generator(device=_device(model, backend))
        target_gen.manual_seed(derive_seed("afm-targets", seed, 0))
    n = cfg.sequences_per_shard
    rows: list[list[int]] = []
    row_t: list[dict] = []
    buffer: list[int] = []
    buffer_t: list[dict] = []
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
                seqs, targets = _vllm_sample(llm, batch_prompts, max_new, cfg, seed + call, spec)
            else:
                seqs, targets = _hf_sample(
                    model, batch_prompts, max_new, cfg, pad_id, eos_id, spec, target_gen
                )
            call += 1
            if cfg.eos == "ignore":
                new = [s[: cfg.seq_len] for s in seqs]
                rows.extend(new)
                if spec is not None:
                    pairs = zip(targets, new, strict=True)
                    row_t.extend(_cut(t, 0, len(s), spec) for t, s in pairs)
                if progress is not None:
                    progress.update(sum(len(s) for s in new))
            else:  # stop-and-pack: documents back to back, cut into full rows
                before = len(rows)
                for r, s in enumerate(seqs):
                    buffer.extend(s)
                    if spec is not None:
                        buffer_t.append(targets[r])
                    while len(buffer) >= cfg.seq_len and len(rows) < n:
                        rows.append(buffer[: cfg.seq_len])
                        buffer = buffer[cfg.seq_len :]
                        if spec is not None:
                            joined = concat_targets(buffer_t, spec)
                            row_t.append(_cut(joined, 0, cfg.seq_len, spec))
                            buffer_t = [_cut(joined, cfg.seq_len, len(buffer) + cfg.seq_len, spec)]
                if progress is not None:
                    progress.update((len(rows) - before) * cfg.seq_len)
                if call > 1000 * max(1, n // cfg.batch_size):
                    raise RuntimeError("stop-and-pack made no progress (empty documents?)")
    return rows[:n], (row_t[:n] if spec is not None else None)


def _cut(targets: dict, lo: int, hi: int, spec: TargetSpec) -> dict:
    """Positions ``lo:hi`` of per-position targets (padded with missing ones past the end)."""
    part = {c: targets[c][lo:hi] for c in spec.columns()}
    short = (hi - lo) - len(next(iter(part.values())))
    return concat_targets([part, missing_targets(short, spec)], spec) if short > 0 else part


def _device(model: Any, backend: str) -> torch.device:
    if backend == "vllm" or model is None:
        return torch.device("cpu")
    return next(model.parameters()).device


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
    check_seq_len(config, model.config, model_name or str(model.name_or_path))
    prompts = read_prompts(config.prompts_file, tokenizer) if config.prompts_file else None
    backend = sampling_backend(config)
    check_meta(out, config, model_name)  # the first write
    todo = [
        i
        for i in range(config.num_shards)
        if i % world_size == rank and i not in complete_shards(out)
    ]
    # Leftovers of killed runs: only those of the shards this worker writes (a worker on
    # another machine may be writing its own; its pid means nothing here).
    owned = tuple(f".{shard_name(i)}.tmp-" for i in todo)
    remove_orphans(out, owned + ((f".{META}.tmp-", f".{STATS}.tmp-") if rank == 0 else ()))
    if max_shards is not None:
        todo = todo[:max_shards]
    llm = None
    if todo and backend == "vllm":
        from vllm import LLM

        extra = {}
        if config.target_forms:  # raw (T = 1) logprobs, as many as the targets keep
            extra = {"max_logprobs": config.targets_k, "logprobs_mode": "raw_logprobs"}
        llm = LLM(model=model_name or model.name_or_path, seed=config.seed, **extra)
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
            rows, targets = _generate_shard(i, model, tokenizer, config, prompts, backend, llm, bar)
            spec = TargetSpec.from_config(config) if targets is not None else None
            write_shard(out, i, rows, targets, spec)
            tokens += sum(len(r) for r in rows)
            logger.info("wrote %s (%d sequences)", shard_name(i), len(rows))
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
        write_json_atomic(out / STATS, stats)
        write_index(out)  # datasets.load_from_disk(out) / load_dataset(out) read it
    return stats


def generate_for_model(
    model_name: str,
    out_dir: str | Path,
    config: SyntheticDataConfig,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the teacher ``model_name`` (alias, directory or hub id) and its tokenizer on
    ``device`` (default: CUDA when available, this rank's GPU under torchrun) and run
    :func:`generate_synthetic_data` (``afm-generate``)."""
    from afm.models import load_model, load_tokenizer, resolve_model

    check_device("", "--device", device)
    check_output_path("--output", out_dir)
    check_meta(Path(out_dir), config, model_name, write=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if Path(resolve_model(model_name)).is_dir():
        check_safetensors_files(resolve_model(model_name))
    model = load_model(model_name).to(device)
    tokenizer = load_tokenizer(model_name)
    return generate_synthetic_data(
        model, tokenizer, out_dir, config, model_name=model_name, progress=progress
    )
