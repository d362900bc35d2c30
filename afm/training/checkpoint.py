"""Checkpoints of the distillation trainer: safetensors + JSON, no pickles.

``checkpoints/checkpoint-NNNNNNN/``: ``model.safetensors`` (the student, shared
tensors handled by ``safetensors.torch.save_model``), ``optimizer.safetensors`` +
``optimizer.json`` (AdamW state tensors / param groups), ``scheduler.json``,
``afm_config.json``, ``rng-rank{r}.safetensors`` (per-rank torch RNG), and
``trainer_state.json`` (step, skipped steps, world size, config fingerprint), and
``manifest.json`` (size and SHA-256 of every other file; written last).  The
directory is assembled under a temporary name (``.checkpoint-NNNNNNN.tmp``) and
renamed, so a killed save leaves only a temporary directory, which the next run
removes; a checkpoint damaged later (a truncated file, a bad disk) fails its manifest
on resume and the run resumes from the newest intact one (:func:`newest_intact`).

FSDP (v1): the same files, consolidated — the full model and optimizer state
dicts are gathered onto the main process and written as above; on resume every
rank reads them and keeps its shard.  (Not accelerate's sharded DCP checkpoints:
DCP pickles its index, and with per-rank key sets — a small parameter such as an
input range lives on one rank only — its loader mistakes the checkpoint for an old
format and fails or, for an optimizer without state yet, silently restores nothing.)
The price is host memory on the main process for the full fp32 state.
FSDP2 (``fully_shard``): the same consolidated files, gathered parameter by parameter
(:mod:`afm.training.fsdp2`); on resume every rank re-shards them.
DeepSpeed: the engine's ``accelerator.save_state`` writes ``engine/`` (accelerate's
RNG pickle is deleted; the RNG lives in ``rng-rank{r}.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.hf import AfmQuantizationConfig
from afm.training.engines import fsdp_full_state_dict_type
from afm.training.files import read_json, sha256_file
from afm.training.fsdp2 import (
    full_optimizer_state,
    full_state,
    shard_optimizer_state,
    shard_state,
)

logger = logging.getLogger(__name__)

CKPT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"

__all__ = [
    "CKPT_PREFIX",
    "MANIFEST",
    "checkpoint_problem",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact",
    "prune_checkpoints",
    "remove_unfinished",
    "save_checkpoint",
]


def _optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors tensors + JSON metadata.

    State keys are parameter indices (plain torch) or parameter names (FSDP's full
    optimizer state dict), so tensors get positional names and the JSON keeps the keys.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: list[list[Any]] = []  # [param key, state key, tensor name or None, scalar]
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                name = f"t{len(tensors)}"
                tensors[name] = v.detach().contiguous().cpu()
                entries.append([idx, k, name, None])
            else:
                entries.append([idx, k, None, v])
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "entries": entries}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[Any, dict[str, Any]] = {}
    for idx, k, name, scalar in meta["entries"]:
        state.setdefault(idx, {})[k] = tensors[name] if name is not None else scalar
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """The checkpoint directories of ``ckpt_root``, oldest first (not verified)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CKPT_PREFIX)
        and p.name[len(CKPT_PREFIX) :].isdigit()
        and ((p / MANIFEST).exists() or (p / "trainer_state.json").exists())
    ]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def _files_of(directory: Path) -> dict[str, Path]:
    return {
        str(f.relative_to(directory)): f
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def _write_manifest(directory: Path) -> None:
    files = {
        rel: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for rel, f in _files_of(directory).items()
    }
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None: it is intact).  Reads every file once
    to check it against the manifest."""
    if not (ckpt / MANIFEST).exists():  # written before manifests existed
        return None if (ckpt / "trainer_state.json").exists() else "no manifest.json"
    try:
        files = read_json(ckpt / MANIFEST, "checkpoint manifest")["files"]
    except (ValueError, KeyError, TypeError) as err:
        return str(err) if str(err) else "manifest.json has no file list"
    for rel, want in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def newest_intact(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that passes :func:`checkpoint_problem`; every damaged newer
    one is named in a warning (they are overwritten when their step is saved again)."""
    damaged = 0
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                logger.warning("resuming from %s, the newest intact checkpoint", ckpt)
            return ckpt
        damaged += 1
        logger.warning("checkpoint %s is damaged (%s); trying an older one", ckpt, problem)
    if damaged:
        logger.warning("no intact checkpoint in %s: training starts from step 0", ckpt_root)
    return None


def remove_unfinished(ckpt_root: Path) -> None:
    """Remove the temporary directories of saves that were killed (call it on the main
    process before training starts, with the run's lock held: nothing else writes here)."""
    if not ckpt_root.is_dir():
        return
    for tmp in sorted(ckpt_root.glob(f".{CKPT_PREFIX}*.tmp")):
        final = ckpt_root / tmp.name[1 : -len(".tmp")]
        done = (tmp / MANIFEST).exists() and checkpoint_problem(tmp) is None
        if done and not final.exists():  # killed between the manifest and the rename
            os.rename(tmp, final)
            logger.info("finished the save of %s (killed before its rename)", final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info("removed %s, left by a save that was killed", tmp)
    for old in sorted(ckpt_root.glob(f".{CKPT_PREFIX}*.old")):
        shutil.rmtree(old, ignore_errors=True)


def _save_optimizer(sd: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = _optimizer_to_tensors(sd)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(meta))


def _load_optimizer(directory: Path) -> dict:
    from safetensors.torch import load_file

    meta = read_json(directory / "optimizer.json", "checkpoint file")
    return _optimizer_from_tensors(load_file(str(directory / "optimizer.safetensors")), meta)


def _fsdp_full_state(accelerator: Any, model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on the main process (FSDP v1; collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with fsdp_full_state_dict_type(accelerator, model, rank0_only=True):
        model_sd = model.state_dict()
        optim_sd = FSDP.optim_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    return model_sd, optim_sd


def save_checkpoint(
    accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, root: Path, state: dict
) -> None:
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file, save_model

    step = state["step"]
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".{CKPT_PREFIX}{step:07d}.tmp"  # one name for every rank
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(str(tmp / "engine"), safe_serialization=True)
        # accelerate pickles the RNG states; ours are in rng-rank*.safetensors (and
        # load_state tolerates the missing file), so drop the pickle.
        (tmp / "engine" / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    elif getattr(accelerator, "is_fsdp2", False):
        model_sd = full_state(model)  # collective: every rank gathers, the main one writes
        optim_sd = full_optimizer_state(getattr(optimizer, "optimizer", optimizer))
        if accelerator.is_main_process:
            save_file(model_sd, str(tmp / "model.safetensors"))
            _save_optimizer(optim_sd, tmp)
    elif accelerator.distributed_type == DistributedType.FSDP:
        model_sd, optim_sd = _fsdp_full_state(accelerator, model, optimizer)  # collective
        if accelerator.is_main_process:
            save_file(model_sd, str(tmp / "model.safetensors"))
            _save_optimizer(optim_sd, tmp)
    elif accelerator.is_main_process:
        save_model(unwrapped, str(tmp / "model.safetensors"))
        _save_optimizer(getattr(optimizer, "optimizer", optimizer).state_dict(), tmp)
    if accelerator.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        qc = AfmQuantizationConfig.from_model(unwrapped).to_dict()
        (tmp / "afm_config.json").write_text(json.dumps(qc, indent=2))
    save_file(_rng_state(), str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _write_manifest(tmp)
        old = root / f".{final.name}.old"  # a damaged checkpoint of this step, replaced
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()


def prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, ckpt: Path
) -> dict:
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, load_model

    state = read_json(ckpt / "trainer_state.json", "checkpoint file")
    if state.get("world_size") != accelerator.num_processes:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {state.get('world_size')} processes; this run "
            f"has {accelerator.num_processes}: resume with the same number of processes"
        )
    inner = getattr(optimizer, "optimizer", optimizer)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(ckpt / "engine"))
    elif getattr(accelerator, "is_fsdp2", False):
        # Every rank reads the full files and keeps its shards (same order everywhere).
        model.load_state_dict(shard_state(model, load_file(str(ckpt / "model.safetensors"))))
        inner.load_state_dict(shard_optimizer_state(inner, _load_optimizer(ckpt)))
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Every rank reads the full files and keeps its shard (no broadcast needed).
        with fsdp_full_state_dict_type(accelerator, model, rank0_only=False):
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            full = _load_optimizer(ckpt)
            inner.load_state_dict(FSDP.optim_state_dict_to_load(model, inner, full))
    else:
        load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"))
        inner.load_state_dict(_load_optimizer(ckpt))
    scheduler.load_state_dict(read_json(ckpt / "scheduler.json", "checkpoint file"))
    _set_rng_state(load_file(str(ckpt / f"rng-rank{accelerator.process_index}.safetensors")))
    return state
