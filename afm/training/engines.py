"""The distributed engines under the trainer: accelerate, DDP, FSDP (v1), DeepSpeed ZeRO.

* :func:`make_accelerator` — the ``Accelerator`` for a run (gloo DDP on CPUs), with the
  ``train.report_to`` trackers (refused when not installed: accelerate drops them
  silently); :func:`check_launch` refuses a launch that asked for several processes
  and runs one; :func:`describe` is the start-up line (world size, device, backend);
* :func:`clip_after_step` — weight clipping on the parameters the optimizer really
  updates (no engine source is patched):

  - single device / DDP: ``afm.register_clip_hook`` on the torch optimizer inside
    accelerate's wrapper — it holds the fp32 parameters (autocast keeps them fp32)
    and the hook only fires when a step really ran (not on fp16 overflow skips);
  - FSDP (v1): after the step, ``FSDP.summon_full_params(writeback=True)`` and clip
    full rows (a shard may split a row);
  - FSDP2 (``fully_shard``): on the sharded fp32 parameters (:mod:`afm.training.fsdp2`);
  - DeepSpeed ZeRO 1/2/3: after the engine's step, ``deepspeed.utils.
    safe_get_full_fp32_param`` → clip → ``safe_set_full_fp32_param`` on the master
    copy, then the low-precision copy is refreshed from it;

* :func:`full_parameters`, :func:`skeleton` / :func:`rebuild` — the whole (unsharded,
  fp32) student: FSDP and ZeRO-3 split every parameter across ranks, and DeepSpeed
  keeps the fp32 masters apart from the module's (fp16/bf16) parameters; checkpoints
  and the final model need the whole fp32 thing.  The gathering helpers are collective
  calls: every rank must make them, the result lands on the main process.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.clipping import clip_weights_, register_clip_hook
from afm.analog.experts import AnalogExperts
from afm.analog.layers import analog_layers
from afm.config import ClipKind
from afm.reference import clip_weight_
from afm.training.fsdp2 import clip_sharded_

__all__ = [
    "check_launch",
    "clip_after_step",
    "describe",
    "fsdp_full_state_dict_type",
    "full_parameters",
    "make_accelerator",
    "needs_gathered_copy",
    "rebuild",
    "skeleton",
]


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
    if getattr(accelerator, "is_fsdp2", False):
        gathered: dict[str, torch.Tensor] = {}
        for name, p in accelerator.unwrap_model(model).named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective
            if accelerator.is_main_process:  # the other ranks drop it at once
                gathered[name] = full.detach().cpu()
        return gathered
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


def _check_trackers(names: list[str]) -> None:
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            hint = (
                "pip install 'afm[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            )
            raise ImportError(f"train.report_to: tracker {name!r} is not installed ({hint})")


def make_accelerator(cfg: Any, project_dir: str | Path | None = None) -> Any:
    """The ``Accelerator`` for a ``DistillConfig`` (gloo DDP when launched on CPUs);
    ``cfg.report_to`` trackers write under ``project_dir`` (required with trackers)."""
    from accelerate import Accelerator

    trackers = list(getattr(cfg, "report_to", []) or [])
    if trackers:
        _check_trackers(trackers)
        if project_dir is None:
            raise ValueError("train.report_to needs a tracker directory (project_dir)")
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        cpu=not torch.cuda.is_available(),  # under torchrun on CPU: gloo DDP
        log_with=trackers or None,
        project_dir=str(project_dir) if project_dir is not None else None,
    )
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Any) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1): accelerate's simple
    launcher then starts ONE process (it sets ``MASTER_ADDR`` but no ``WORLD_SIZE``), and
    the run would silently train on one rank."""
    if (
        accelerator.num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
        and os.environ.get("MASTER_ADDR")
        and "WORLD_SIZE" not in os.environ
    ):
        raise ValueError(
            "accelerate launch --cpu --num_processes N started one process, not N "
            "(accelerate's CPU launcher does not spawn ranks); for N CPU ranks run "
            "torchrun --nproc_per_node N -m afm.cli.train ... (gloo)"
        )


def describe(accelerator: Any) -> str:
    """World size, device, engine, collective backend and precision, in one line."""
    backend = "none"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = str(torch.distributed.get_backend())
    engine = str(accelerator.distributed_type).split(".")[-1]
    if getattr(accelerator, "is_fsdp2", False):
        engine += " (fsdp_version 2)"
    return (
        f"{accelerator.num_processes} process(es), device {accelerator.device}, engine "
        f"{engine}, backend {backend}, mixed precision {accelerator.mixed_precision}"
    )


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory).

    Taken before the engine wraps the student, it keeps the structure, the analog
    configs, buffers and tied parameters; :func:`rebuild` fills it with trained values.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(module, memo)


def rebuild(skeleton: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """Materialise ``skeleton``'s parameters from whole trained values (ties preserved)."""
    new: dict[int, nn.Parameter] = {}
    for mod in skeleton.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
            mod._parameters[name] = new[id(p)]
    own = dict(skeleton.named_parameters())  # tied parameters once, as in ``params``
    if own.keys() != params.keys():
        raise RuntimeError(
            "gathered parameters do not match the student: missing "
            f"{sorted(own.keys() - params.keys())}, unexpected {sorted(params.keys() - own.keys())}"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])
    return skeleton


def _refresh_forward_copy(weight: nn.Parameter, master: torch.Tensor) -> None:
    """Copy the clipped master into the parameter the forward reads (DeepSpeed).

    ``safe_set_full_fp32_param`` only writes the optimizer's fp32 partition; the
    forward reads the (low-precision) parameter, which DeepSpeed refreshes from the
    master only at the next step — without this the forward would see every clip one
    step late and the final weights would be unclipped.
    """
    if hasattr(weight, "ds_id"):  # ZeRO-3: gather, overwrite, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            weight.data.copy_(master.view_as(weight))
    elif weight.numel() == master.numel():  # ZeRO-1/2: full parameter on every rank
        weight.data.copy_(master.view_as(weight))


def _clipped_weights(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters clipping acts on: the weight, or a MoE layer's fused expert weights."""
    if isinstance(layer, AnalogExperts):
        return [getattr(layer, proj) for proj in layer.projections]
    return [layer.weight]


def _crossbars(layer: nn.Module, master: torch.Tensor) -> list[torch.Tensor]:
    """``[out, in]`` views of ``master`` that are clipped on their own (one per expert)."""
    if not isinstance(layer, AnalogExperts):
        return [master]
    return [master[e].t() if layer.is_transposed else master[e] for e in range(master.shape[0])]


def clip_after_step(accelerator: Any, model: nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """The clipping that acts on the weights the optimizer updates.

    Returns ``(call after every real step or None, hook handle to remove or None)``:
    DeepSpeed and FSDP need an explicit call after the step; otherwise a step
    post-hook on the inner torch optimizer is installed.
    """
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    unwrapped = accelerator.unwrap_model(model)
    if dt == DistributedType.DEEPSPEED:

        def clip_ds() -> None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            for layer in analog_layers(unwrapped).values():
                clip = layer.analog_config.clip
                if clip.kind is ClipKind.NONE:
                    continue
                for weight in _clipped_weights(layer):
                    master = safe_get_full_fp32_param(weight)
                    if master is None:
                        continue
                    full = master.view(getattr(weight, "ds_shape", weight.shape))
                    for crossbar in _crossbars(layer, full):
                        clip_weight_(crossbar, clip.kind, clip.sigma)
                    safe_set_full_fp32_param(weight, master)  # the optimizer's copy
                    _refresh_forward_copy(weight, master)

        return clip_ds, None
    if getattr(accelerator, "is_fsdp2", False):
        return lambda: clip_sharded_(unwrapped), None
    if dt == DistributedType.FSDP:

        def clip_fsdp() -> None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=True, with_grads=False):
                clip_weights_(unwrapped)

        return clip_fsdp, None
    inner = getattr(optimizer, "optimizer", optimizer)
    return None, register_clip_hook(inner, unwrapped)
