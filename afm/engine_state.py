"""Whole (unsharded, fp32) state of a student trained under FSDP or DeepSpeed.

FSDP (v1) and DeepSpeed ZeRO-3 split every parameter across ranks, and DeepSpeed
keeps the fp32 masters apart from the module's (fp16/bf16) parameters; checkpoints
and the final model need the whole fp32 thing.  These helpers are collective calls:
every rank must make them, the result lands on the main process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fsdp_full_state_dict_type", "full_parameters", "needs_gathered_copy"]


def needs_gathered_copy(accelerator: Any) -> bool:
    """True where the module passed to the engine does not end up holding the trained
    fp32 weights: FSDP (shards), DeepSpeed (ZeRO-3 shards; every stage keeps the fp32
    masters apart from module parameters that may be fp16/bf16)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fsdp_full_state_dict_type(accelerator: Any, model: nn.Module, *, rank0_only: bool):
    """``FSDP.state_dict_type`` context for full model + optimizer state dicts."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Offloading to the CPU when the shards already live there crashes torch 2.13
    # (SIGSEGV while cloning), so offload only from accelerators.
    offload = accelerator.device.type != "cpu"
    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    )


def _clean(name: str) -> str:
    """A parameter name without the prefixes of FSDP / checkpoint wrappers."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def full_parameters(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the prepared ``model``, whole and in fp32 master precision.

    FSDP: the full state dict (its flat parameters are the fp32 masters).  DeepSpeed:
    ``safe_get_full_fp32_param`` per parameter — not accelerate's ``get_state_dict``,
    which under ZeRO-3 returns the low-precision copies.  Returns ``{}`` on the other
    ranks.
    """
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt == DistributedType.FSDP:
        with fsdp_full_state_dict_type(accelerator, model, rank0_only=True):
            state = model.state_dict()
        names = {_clean(n) for n, _ in accelerator.unwrap_model(model).named_parameters()}
        return {k: v for k, v in state.items() if k in names} if state else {}
    if dt == DistributedType.DEEPSPEED:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, p in accelerator.unwrap_model(model).named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # frozen parameter: no fp32 master, gather the parameter
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().float().clone()
            if accelerator.is_main_process:
                out[name] = full.detach().cpu().clone()
        return out
    unwrapped = accelerator.unwrap_model(model)
    return {n: p.detach() for n, p in unwrapped.named_parameters()}
