"""Checkpoints of ``afm.distill``: safetensors + JSON, no pickles.

``checkpoints/checkpoint-NNNNNNN/``: ``model.safetensors`` (the student, shared
tensors handled by ``safetensors.torch.save_model``), ``optimizer.safetensors`` +
``optimizer.json`` (AdamW state tensors / param groups), ``scheduler.json``,
``afm_config.json``, ``rng-rank{r}.safetensors`` (per-rank torch RNG), and
``trainer_state.json`` (step, skipped steps, world size, config fingerprint;
written last, so a directory without it is incomplete).  The directory is
assembled under a temporary name and renamed.  Under DeepSpeed / FSDP the
engine's ``accelerator.save_state`` replaces the model and optimizer files.
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

from afm.hf import AfmQuantizationConfig

logger = logging.getLogger(__name__)

CKPT_PREFIX = "checkpoint-"

__all__ = [
    "CKPT_PREFIX",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]


def _optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
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
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CKPT_PREFIX)
        and p.name[len(CKPT_PREFIX) :].isdigit()
        and (p / "trainer_state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def save_checkpoint(
    accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, root: Path, state: dict
) -> None:
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file, save_model

    step = state["step"]
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".{CKPT_PREFIX}{step:07d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        accelerator.save_state(str(tmp / "engine"), safe_serialization=True)
    elif accelerator.is_main_process:
        save_model(unwrapped, str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_to_tensors(
            getattr(optimizer, "optimizer", optimizer).state_dict()
        )
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    if accelerator.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        qc = AfmQuantizationConfig.from_model(unwrapped).to_dict()
        (tmp / "afm_config.json").write_text(json.dumps(qc, indent=2))
    save_file(_rng_state(), str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
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

    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("world_size") != accelerator.num_processes:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {state.get('world_size')} processes; this run "
            f"has {accelerator.num_processes}: resume with the same number of processes"
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        accelerator.load_state(str(ckpt / "engine"))
    else:
        load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"))
        meta = json.loads((ckpt / "optimizer.json").read_text())
        sd = _optimizer_from_tensors(load_file(str(ckpt / "optimizer.safetensors")), meta)
        getattr(optimizer, "optimizer", optimizer).load_state_dict(sd)
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    _set_rng_state(load_file(str(ckpt / f"rng-rank{accelerator.process_index}.safetensors")))
    return state
