"""FSDP2 (torch's ``fully_shard``, accelerate's ``fsdp_version: 2``) under the trainer.

``fully_shard`` turns every parameter into a ``DTensor`` sharded on dim 0 (rows of a
weight), in place: no wrapper module, unchanged parameter names.  What the analog
recipe needs from it:

* clipping on the master weights the optimizer updates (the sharded fp32 parameters):
  per-channel clipping needs whole rows, and a dim-0 shard holds whole rows, so each
  rank clips its own rows; per-matrix clipping gathers the matrix, clips it and keeps
  its shard (:func:`clip_sharded_`);
* the whole student and consolidated checkpoints: every rank gathers each parameter
  (``DTensor.full_tensor``, a collective, in the same order everywhere), the main process
  writes one safetensors file; on resume every rank reads the files and keeps its shard
  (``distribute_tensor``).  Optimizer states (Adam moments) are DTensors like their
  parameters and are gathered / re-sharded the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from afm.analog.layers import analog_layers
from afm.config import ClipKind
from afm.reference import clip_weight_

__all__ = [
    "clip_sharded_",
    "full_optimizer_state",
    "full_state",
    "shard_optimizer_state",
    "shard_state",
]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu().clone()


@torch.no_grad()
def clip_sharded_(model: nn.Module) -> None:
    """Clip every analog weight of an FSDP2 ``model`` on its shards (collective)."""
    from torch.distributed.tensor import distribute_tensor

    for layer in analog_layers(model).values():
        clip = layer.analog_config.clip
        if clip.kind is ClipKind.NONE:
            continue
        w = layer.weight
        if not _is_dtensor(w):
            clip_weight_(w.data, clip.kind, clip.sigma)
            continue
        rows_local = all(p.is_shard(0) for p in w.placements)
        if clip.kind is ClipKind.GAUSSIAN_PER_CHANNEL and rows_local:
            local = w.to_local()
            if local.numel():
                clip_weight_(local, clip.kind, clip.sigma)
            continue
        full = w.full_tensor()
        clip_weight_(full, clip.kind, clip.sigma)
        w.to_local().copy_(distribute_tensor(full, w.device_mesh, w.placements).to_local())


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict (parameters and buffers) on every rank (collective)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def shard_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``full`` with every entry that is a DTensor in ``model`` re-sharded like it."""
    from torch.distributed.tensor import distribute_tensor

    own = model.state_dict()
    out: dict[str, Any] = {}
    for k, v in full.items():
        ref = own.get(k)
        if ref is not None and _is_dtensor(ref):
            out[k] = distribute_tensor(v.to(ref.dtype), ref.device_mesh, ref.placements)
        else:
            out[k] = v
    return out


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with DTensor states gathered (collective)."""
    sd = optimizer.state_dict()
    state = {
        idx: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()}
        for idx, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: Any, full: dict[str, Any]) -> dict[str, Any]:
    """``full`` with each state tensor of a DTensor parameter sharded like the parameter."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[Any, dict[str, Any]] = {}
    for idx, s in full["state"].items():
        p = params[int(idx)]
        state[int(idx)] = {
            k: distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
            if torch.is_tensor(v) and _is_dtensor(p) and v.shape == p.shape
            else v
            for k, v in s.items()
        }
    return {"state": state, "param_groups": full["param_groups"]}
