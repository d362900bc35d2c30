"""aihwkit-lightning state dicts: read without running them, renamed to afm's parameters.

An aihwkit-lightning ``AnalogLinear`` stores, besides ``weight`` and ``bias``:

* ``input_range`` [tiles] — the learned ranges (static ranges only): afm's
  ``input_range``, in fp32;
* ``input_range_update_idx`` [tiles] — how many batches each range was initialised
  from data on: summarised by :func:`range_counters` (it decides afm's
  ``init_steps``) and not stored;
* ``x_min`` / ``x_max`` [tiles] — statistics of the fast range mode, which the
  importer refuses, so they are unused: dropped and reported;
* ``learnable_weight_clip`` — learned clipping (refused with the config).

``module.state_dict()`` also keeps a copy of the layer's ``rpu_config`` in
``state_dict._metadata``; :func:`read_state_dict` returns those copies so that they
can be checked against the ``rpu_config`` file.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from afm.analog.layers import AnalogLinear
from afm.interop.unpickle import PickledObject, UnsafePickleError, torch_safe_globals

__all__ = [
    "LightningState",
    "StateMismatchError",
    "range_counters",
    "read_state_dict",
    "to_afm_state",
]

_COUNTER = "input_range_update_idx"
_FAST_MODE_STATS = ("x_min", "x_max")


class StateMismatchError(ValueError):
    """The state dict does not fit the model built from ``config.json`` (keys or shapes)."""


@dataclass
class LightningState:
    tensors: dict[str, Tensor]
    embedded_configs: dict[str, PickledObject] = field(default_factory=dict)
    """``rpu_config`` copies found in ``state_dict._metadata`` (key: "file:prefix")."""


def _refusal_reason(err: Exception) -> str:
    """The sentence of torch's multi-paragraph message that says what was refused."""
    paragraphs = [" ".join(p.split()) for p in str(err).split("\n\n") if p.strip()]
    skip = ("Weights only load failed", "Check the documentation")
    reason = next(
        (p for p in paragraphs if not p.startswith(skip)), paragraphs[0] if paragraphs else ""
    )
    reason = reason.removeprefix("WeightsUnpickler error: ")
    return re.split(r"\. (?:Please|Check)", reason)[0].rstrip(".")[:300]


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with only afm's config stand-ins added."""
    with torch.serialization.safe_globals(torch_safe_globals()):
        try:
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as err:
            raise UnsafePickleError(
                f"{path.name}: refused to unpickle ({_refusal_reason(err)}); nothing in it was "
                "run: afm reads state dicts with torch.load(weights_only=True), which allows "
                "tensors, plain containers and aihwkit-lightning's config classes only"
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"{path.name}: not a readable torch state dict ({err})") from None


def _read_one(path: Path) -> tuple[dict[str, Tensor], dict[str, PickledObject]]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), {}
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path.name}: holds a {type(obj).__name__}, expected a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path.name}: entry {bad[0]!r} is not a tensor; expected a state dict")
    configs = {}
    for prefix, meta in (getattr(obj, "_metadata", None) or {}).items():
        if isinstance(meta, Mapping) and "rpu_config" in meta:
            configs[f"{path.name}:{prefix or '<root>'}"] = meta["rpu_config"]
    return dict(obj), configs


def read_state_dict(files: Sequence[Path]) -> LightningState:
    """All shards merged (a key in two shards is an error)."""
    state = LightningState({})
    for path in files:
        tensors, configs = _read_one(Path(path))
        twice = sorted(set(tensors) & set(state.tensors))
        if twice:
            raise ValueError(f"{Path(path).name}: key {twice[0]!r} is also in an earlier shard")
        state.tensors.update(tensors)
        state.embedded_configs.update(configs)
    return state


def range_counters(tensors: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """``{layer: input_range_update_idx per tile}``: range-initialisation batches seen."""
    suffix = "." + _COUNTER
    return {
        k[: -len(suffix)]: [int(c) for c in v.reshape(-1).tolist()]
        for k, v in tensors.items()
        if k.endswith(suffix)
    }


def _check_keys(expected: set[str], given: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not (missing or unexpected):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{label} {keys[:5]}{more}")
    raise StateMismatchError(f"the state dict does not fit {what}: {'; '.join(parts)}")


def to_afm_state(
    tensors: Mapping[str, Tensor], model: torch.nn.Module, layers: Mapping[str, AnalogLinear]
) -> tuple[dict[str, Tensor], list[str]]:
    """afm's state dict for ``model`` (its analog ``layers`` converted already) and the
    aihwkit-lightning keys that were dropped (counters and fast-mode statistics)."""
    state = dict(tensors)
    dropped = []
    for name, layer in layers.items():
        for extra in (_COUNTER, *_FAST_MODE_STATS):
            if state.pop(f"{name}.{extra}", None) is not None:
                dropped.append(f"{name}.{extra}")
        tiles = layer.input_range.numel()
        key = f"{name}.input_range"
        if not layer.analog_config.input.uses_range:
            init = layer.analog_config.input.init_value  # dynamic / no ranges: unused
            state.setdefault(key, torch.full((tiles,), init, dtype=torch.float32))
        elif key in state:
            if state[key].numel() != tiles:
                raise StateMismatchError(
                    f"{key} has {state[key].numel()} entries, the layer has {tiles} tiles "
                    f"(mapping.max_input_size={layer.analog_config.max_input_size})"
                )
            state[key] = state[key].detach().reshape(tiles).float().clone()
    _check_keys(set(model.state_dict()), set(state), f"{type(model).__name__} from config.json")
    seen: set[int] = set()
    for key, tensor in state.items():  # shared storage (a tied head saved twice): one copy each
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            state[key] = tensor.clone()
        seen.add(ptr)
    return state, dropped
