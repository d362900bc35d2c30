"""Read aihwkit-lightning's pickles without running anything they contain.

IBM's published analog foundation models come as torch-pickled state dicts and a
``dill``-pickled ``TorchInferenceRPUConfig``.  Unpickling calls whatever the file
names, so both are read here through allowlists:

* the ``rpu_config`` file with :class:`RestrictedUnpickler`, a ``pickle.Unpickler``
  whose ``find_class`` (the only way a pickle reaches a Python object: ``GLOBAL``,
  ``STACK_GLOBAL``, ``INST``, ``OBJ`` and the ``EXT`` opcodes all go through it) hands
  out plain stand-ins for aihwkit-lightning's config classes and enums and refuses
  everything else;
* state dicts with ``torch.load(weights_only=True)`` (tensors and plain containers
  only), with the same stand-ins allowed: ``module.state_dict()`` of an
  aihwkit-lightning model carries a copy of the layer's ``rpu_config`` in
  ``state_dict._metadata``.

What dill writes for these classes (dill 0.4, its default protocol 4, checked with
``pickletools``): standard opcodes only — ``STACK_GLOBAL`` + ``NEWOBJ`` + ``BUILD``
for the dataclasses, ``REDUCE`` of the enum class on the member's value for enums; no
``dill._dill`` reconstructor.  Protocols 0 and 1 add
``copy_reg._reconstructor(cls, dill._dill._load_type('object'), None)``: the two are
allowed as stand-ins that only accept exactly that.  Neither aihwkit-lightning nor
dill is imported (nor needed).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LIGHTNING_CLASSES",
    "LIGHTNING_ENUMS",
    "PickledEnum",
    "PickledObject",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "load_rpu_config",
    "plain",
    "torch_safe_globals",
]

_PKG = "aihwkit_lightning.simulator"

#: The config classes a ``TorchInferenceRPUConfig`` is made of (aihwkit-lightning 1.x
#: and 2.x define them in the same modules): full name -> short name.
LIGHTNING_CLASSES: dict[str, str] = {
    f"{_PKG}.configs.configs.TorchInferenceRPUConfig": "TorchInferenceRPUConfig",
    f"{_PKG}.parameters.io.IOParameters": "IOParameters",
    f"{_PKG}.parameters.inference.WeightClipParameter": "WeightClipParameter",
    f"{_PKG}.parameters.inference.WeightModifierParameter": "WeightModifierParameter",
    f"{_PKG}.parameters.mapping.MappingParameter": "MappingParameter",
    f"{_PKG}.parameters.pre_post.PrePostProcessingParameter": "PrePostProcessingParameter",
    f"{_PKG}.parameters.pre_post.InputRangeParameter": "InputRangeParameter",
}

#: Its enums: full name -> the values their members have (all strings).
LIGHTNING_ENUMS: dict[str, frozenset[str]] = {
    f"{_PKG}.parameters.enums.WeightModifierType": frozenset(
        {
            "None",
            "Discretize",
            "DiscretizePerChannel",
            "AddNormal",
            "AddNormalPerChannel",
            "DiscretizeAddNormal",
            "DiscretizeAddNormalPerChannel",
        }
    ),
    f"{_PKG}.parameters.enums.WeightNoiseInjectionType": frozenset(
        {"None", "AddNormal", "AddNormalPerChannel"}
    ),
    f"{_PKG}.parameters.enums.WeightQuantizationType": frozenset(
        {"None", "Discretize", "DiscretizePerChannel"}
    ),
    f"{_PKG}.parameters.enums.WeightClipType": frozenset(
        {"None", "LayerGaussian", "LayerGaussianPerChannel", "LearnablePerChannel"}
    ),
}


_MAX_RPU_CONFIG_BYTES = 1 << 20


class UnsafePickleError(ValueError):
    """A pickle asked for something outside the allowlist (nothing was run)."""


class PickledObject:
    """Plain stand-in for an allowlisted config class: its short name and its fields.

    One subclass per aihwkit-lightning class (``class_name`` says which); instances
    are made by the unpickler (``__new__`` without arguments) and filled by
    ``__setstate__`` with the pickled ``__dict__``.
    """

    class_name: str = ""
    fields: dict[str, Any]

    def __new__(cls, *args: Any) -> PickledObject:
        if args:  # NEWOBJ / REDUCE with arguments: not what a dataclass pickle holds
            raise UnsafePickleError(f"{cls.class_name} built with arguments {args!r:.80}")
        obj = super().__new__(cls)
        obj.fields = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict, slotstate) form of protocol 2+
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(
                f"{self.class_name}: pickled state is a {type(state).__name__}, "
                "expected a dict of fields"
            )
        self.fields = dict(state)

    def __repr__(self) -> str:
        return f"{self.class_name}({self.fields!r})"


@dataclass(frozen=True)
class PickledEnum:
    """Plain stand-in for a member of an allowlisted enum: ``WeightClipType('None')``."""

    enum: str  # short name, e.g. "WeightClipType"
    value: str

    def __repr__(self) -> str:
        return f"{self.enum}({self.value!r})"


def _stand_in_class(full_name: str, short: str) -> type[PickledObject]:
    cls = type(short, (PickledObject,), {"class_name": short, "__module__": __name__})
    cls.__qualname__ = f"PickledObject[{full_name}]"
    return cls


def _enum_factory(full_name: str) -> Callable[[Any], PickledEnum]:
    short = full_name.rpartition(".")[2]

    def make(value: Any) -> PickledEnum:
        if not isinstance(value, str):
            raise UnsafePickleError(f"{short}: member value {value!r} is not a string")
        return PickledEnum(short, value)

    make.__qualname__ = f"enum[{full_name}]"
    return make


class _ObjectMarker:
    """``object`` as the base argument of protocol 0/1's ``copy_reg._reconstructor``."""


_OBJECT = _ObjectMarker()


def _reconstructor(cls: Any, base: Any, state: Any) -> PickledObject:
    """``copyreg._reconstructor`` restricted to ``(stand-in class, object, None)``."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafePickleError(f"copy_reg._reconstructor called on {cls!r}")
    if base is not _OBJECT or state is not None:
        raise UnsafePickleError("copy_reg._reconstructor with a base other than object")
    return cls.__new__(cls)


def _load_type(name: Any) -> _ObjectMarker:
    """``dill._dill._load_type`` restricted to ``'object'`` (protocol 0/1 of dill)."""
    if name != "object":
        raise UnsafePickleError(f"dill._dill._load_type({name!r}) is not allowed")
    return _OBJECT


_STAND_INS: dict[str, Any] = {
    **{full: _stand_in_class(full, short) for full, short in LIGHTNING_CLASSES.items()},
    **{full: _enum_factory(full) for full in LIGHTNING_ENUMS},
}
_PROTOCOL_0_HELPERS: dict[str, Any] = {
    "copyreg._reconstructor": _reconstructor,
    "copy_reg._reconstructor": _reconstructor,
    "dill._dill._load_type": _load_type,
    "builtins.object": _OBJECT,
    "__builtin__.object": _OBJECT,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles aihwkit-lightning configs into :class:`PickledObject` / :class:`PickledEnum`.

    Every global the pickle names is looked up in the allowlist; anything else raises
    :class:`UnsafePickleError` before it is imported, so nothing outside the allowlist
    is imported or called.  Persistent ids are refused by ``pickle.Unpickler`` itself.
    """

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        found = _STAND_INS.get(full, _PROTOCOL_0_HELPERS.get(full))
        if found is None:
            raise UnsafePickleError(
                f"refused to load {full!r}: not one of aihwkit-lightning's config classes "
                "or enums (nothing was imported or run)"
            )
        return found


def load_rpu_config(path: str | Path) -> PickledObject:
    """The ``rpu_config`` file (``dill.dump`` of a ``TorchInferenceRPUConfig``) as plain data."""
    path = Path(path)
    size = path.stat().st_size
    if size > _MAX_RPU_CONFIG_BYTES:  # a config is a few kB: do not read a bomb into memory
        raise UnsafePickleError(f"{path.name}: {size} bytes, too large for an rpu_config")
    data = path.read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path.name}: {err}") from None
    except Exception as err:  # a corrupt pickle fails in many ways; none ran code
        raise UnsafePickleError(
            f"{path.name}: not a readable pickle ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(obj, PickledObject) or obj.class_name != "TorchInferenceRPUConfig":
        raise UnsafePickleError(
            f"{path.name}: holds {obj!r:.80}, expected an aihwkit-lightning TorchInferenceRPUConfig"
        )
    return obj


def torch_safe_globals() -> list[tuple[Any, str]]:
    """The stand-ins as ``(object, full name)`` pairs for ``torch.serialization.safe_globals``."""
    return [(obj, full) for full, obj in _STAND_INS.items()]


def plain(value: Any) -> Any:
    """JSON-ready copy: stand-ins become ``{"class": ..., fields}`` / ``"Enum.value"``."""
    if isinstance(value, PickledObject):
        return {"class": value.class_name, **{k: plain(v) for k, v in value.fields.items()}}
    if isinstance(value, PickledEnum):
        return f"{value.enum}.{value.value}"
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
