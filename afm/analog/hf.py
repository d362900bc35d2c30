"""transformers integration: quantization method "afm".

``afm.convert`` puts a *live* :class:`AfmQuantizationConfig` on ``model.config``: it
describes the model's analog layers as they are whenever it is serialised, so a plain
``model.save_pretrained(dir)`` writes the hardware config into ``config.json``
(``quantization_config.quant_method == "afm"``) even after ``AnalogLinear.set_config``
or ``afm.set_chip`` changed a layer's chip; ``afm.revert`` removes it.  After
``import afm``, ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the analog layers
on the meta device before the weights (and ``input_range`` tensors) are loaded, and
:mod:`afm.analog.load_checks` (installed by :mod:`afm.analog.guards`) refuses
checkpoints whose chip or tensors are missing or damaged.  A plain checkpoint can be
converted on the fly with
``from_pretrained(dir, quantization_config=AfmQuantizationConfig(config))``.

There is no plugin discovery in transformers: without ``import afm`` it only logs
"Unknown quantization type" and loads plain Linear layers.  Importing any afm module
(``afm.models``, the CLIs, the lm-eval model) runs ``afm/__init__`` first, which imports
this module.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.load_checks import (
    LOAD_CONTEXT_ATTR,
    LoadContext,
    check_loaded_tensors,
)
from afm.analog.select import is_linear_like, name_matches, set_module
from afm.config import CONFIG_VERSION, AnalogConfig
from afm.presets import get_preset

logger = logging.getLogger(__name__)

QUANT_METHOD = "afm"
_KNOWN_KEYS = {"quant_method", "version", "config", "modules", "overrides", "convert_lm_head"}
#: Wrapper modules torch inserts into module names (FSDP, activation checkpointing);
#: the checkpoint's names do not have them.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _checkpoint_config(value: Any, where: str) -> AnalogConfig:
    """An ``AnalogConfig`` from a preset name, an instance or a *complete* dict.

    A dict must state every field: a checkpoint's chip is never completed from defaults
    (afm writes full dicts; a new field needs a ``CONFIG_VERSION`` bump and a default for
    older versions here).
    """
    if isinstance(value, AnalogConfig):
        return value
    if isinstance(value, str):
        return get_preset(value)
    if not isinstance(value, dict):
        raise ValueError(
            f"afm quantization_config: {where}={value!r} is invalid: a checkpoint must state "
            "its chip (an AnalogConfig dict, as afm writes it); to convert on the fly pass "
            "a preset name or an AnalogConfig"
        )
    full = AnalogConfig().to_dict()
    missing = sorted(set(full) - set(value) - {"version"})
    missing += sorted(
        f"{name}.{field}"
        for name, section in full.items()
        if isinstance(section, dict) and isinstance(value.get(name), dict)
        for field in section
        if field not in value[name]
    )
    if missing:
        raise ValueError(
            f"afm quantization_config: {where} lacks {', '.join(missing)}: a checkpoint "
            "must state its whole chip (re-save the analog model with model.save_pretrained)"
        )
    return AnalogConfig.from_dict(value)


def _clean_name(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _describe(model: nn.Module) -> tuple[AnalogConfig, list[str], dict[str, AnalogConfig]]:
    """``(most common config, analog layer names, {name: config} of the others)``."""
    layers = {_clean_name(n): m for n, m in analog_layers(model).items()}
    if not layers:
        raise ValueError(
            "the model has no AnalogLinear layers: call afm.convert first (or afm.revert, "
            "which also removes the afm quantization_config)"
        )
    configs = [layer.analog_config for layer in layers.values()]
    default = max(set(configs), key=configs.count)
    overrides = {n: m.analog_config for n, m in layers.items() if m.analog_config != default}
    return default, sorted(layers), overrides


class AfmQuantizationConfig(QuantizationConfigMixin):
    """The afm hardware model as a transformers quantization config.

    Args:
        config: the default ``AnalogConfig``, a preset name, or its complete dict.  Required:
            a checkpoint must state its chip (``None`` is an error, never a default chip).
        modules: qualified names of the analog layers; None converts every linear
            layer except the output head (used when converting a plain checkpoint).
        overrides: ``{module name: AnalogConfig dict}`` for layers whose config differs.
        convert_lm_head: with ``modules=None``, also make the output head analog.

    A config *bound* to a model (what ``afm.convert`` and ``from_pretrained`` put on
    ``model.config``) reads ``config`` / ``modules`` / ``overrides`` from the model's
    analog layers each time, so what ``save_pretrained`` writes is never stale.
    """

    def __init__(
        self,
        config: AnalogConfig | dict | str | None = None,
        modules: list[str] | None = None,
        overrides: dict[str, dict] | None = None,
        convert_lm_head: bool = False,
        version: int = CONFIG_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(
                f"afm quantization_config: unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(_KNOWN_KEYS)}"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"afm quantization_config: quant_method={quant_method!r}, expected 'afm'"
            )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"afm quantization_config: version={version!r} is invalid")
        if version > CONFIG_VERSION:
            raise ValueError(
                f"afm quantization_config: checkpoint version {version} is newer than this "
                f"afm understands ({CONFIG_VERSION}); upgrade afm (pip install -U afm)"
            )
        if config is None:
            raise ValueError(
                "afm quantization_config: 'config' is missing: a checkpoint must state its "
                "chip (afm never substitutes a default); to convert on the fly pass one, "
                "e.g. AfmQuantizationConfig('afm-paper')"
            )
        self.quant_method = QUANT_METHOD
        self.version = version
        self._model_ref: weakref.ref | None = None
        self._analog_config = _checkpoint_config(config, "config")
        if modules is not None and (
            not isinstance(modules, list) or not all(isinstance(m, str) for m in modules)
        ):
            raise ValueError(
                f"afm quantization_config: modules={modules!r} must be a list of names"
            )
        self._modules = modules
        if not isinstance(overrides, (dict, type(None))):
            raise ValueError(f"afm quantization_config: overrides={overrides!r} must be a dict")
        self._overrides = {
            k: _checkpoint_config(v, f"overrides[{k!r}]") for k, v in (overrides or {}).items()
        }
        self.convert_lm_head = bool(convert_lm_head)

    # -- the model it describes ----------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> AfmQuantizationConfig:
        """A snapshot of a model's analog layers and their configs (not bound to it)."""
        default, modules, overrides = _describe(model)
        return cls(default, modules=modules, overrides=overrides)

    @classmethod
    def bound_to(cls, model: nn.Module) -> AfmQuantizationConfig:
        """A config that describes ``model``'s analog layers as they are when read."""
        qc = cls.from_model(model)
        qc._model_ref = weakref.ref(model)
        return qc

    def _sync(self) -> None:
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            self._analog_config, self._modules, self._overrides = _describe(model)
            self.convert_lm_head = False  # modules lists the head when it is analog

    @property
    def analog_config(self) -> AnalogConfig:
        self._sync()
        return self._analog_config

    @property
    def modules(self) -> list[str] | None:
        self._sync()
        return self._modules

    @property
    def overrides(self) -> dict[str, AnalogConfig]:
        self._sync()
        return self._overrides

    def config_for(self, name: str) -> AnalogConfig:
        return self.overrides.get(name, self.analog_config)

    # -- copies and serialisation --------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> AfmQuantizationConfig:
        """A copy of a bound config made with its model (``copy.deepcopy(model)``) binds to
        the model's copy; copied alone it still describes the same model."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_model_ref":
                new.__dict__[key] = copy.deepcopy(value, memo)
        model = self._model_ref() if self._model_ref is not None else None
        twin = memo.get(id(model)) if model is not None else None
        new._model_ref = weakref.ref(twin) if twin is not None else self._model_ref
        return new

    def __getstate__(self) -> dict[str, Any]:  # pickling keeps a snapshot (no weakref)
        self._sync()
        return {**self.__dict__, "_model_ref": None}

    def __iter__(self) -> Iterator[tuple[str, Any]]:  # dict(config), as the mixin allows
        yield from self.to_dict().items()

    def to_dict(self) -> dict[str, Any]:
        self._sync()
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "config": self._analog_config.to_dict(),
            "modules": self._modules,
            "overrides": {k: v.to_dict() for k, v in self._overrides.items()},
            "convert_lm_head": self.convert_lm_head,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        return f"AfmQuantizationConfig({self.to_dict()})"


class AfmHfQuantizer(HfQuantizer):
    """Rebuilds ``AnalogLinear`` layers from the config before the weights load."""

    requires_calibration = False

    def __init__(self, quantization_config: AfmQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def _target_modules(self, model: nn.Module) -> list[str]:
        qc: AfmQuantizationConfig = self.quantization_config
        if qc.modules is not None:
            return list(qc.modules)
        skip = set(self.get_modules_to_not_convert(model, None, None, add_default_skips=True))
        if qc.convert_lm_head:
            skip = {s for s in skip if "lm_head" not in s}
        names = []
        for name, module in model.named_modules():
            if not is_linear_like(module) or name_matches(name, skip):
                continue
            names.append(name)
        return names

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        qc: AfmQuantizationConfig = self.quantization_config
        targets = self._target_modules(model)
        if not targets:
            raise ValueError(
                "afm quantization_config selects no layer of this model (modules="
                f"{qc.modules!r}); an afm checkpoint lists its analog layers"
            )
        for name in targets:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"afm checkpoint lists analog layer {name!r}, which this "
                    f"model architecture does not have"
                ) from None
            if isinstance(module, AnalogLinear):
                continue
            layer = AnalogLinear.from_linear(module, qc.config_for(name))
            set_module(model, name, layer)
        if not self.pre_quantized:
            # Converting a plain checkpoint: input_range is not in it (load_checks
            # initialises it; this keeps it out of transformers' "MISSING" report).
            ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            model._keys_to_ignore_on_load_missing = ignore + [r"\.input_range$"]
        files = tuple(str(f) for f in checkpoint_files or ())
        setattr(model, LOAD_CONTEXT_ATTR, LoadContext(not self.pre_quantized, files))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        context: LoadContext | None = model.__dict__.pop(LOAD_CONTEXT_ATTR, None)
        for layer in analog_layers(model).values():
            layer.input_range.data = layer.input_range.data.float()
        check_loaded_tensors(model, context.files if context is not None else ())
        # From now on the config on the model describes its layers as they are.
        model.config.quantization_config = AfmQuantizationConfig.bound_to(model)
        return model

    def update_dtype(self, dtype):  # noqa: ANN001, ANN201
        return dtype

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def attach_quantization_config(model: nn.Module) -> nn.Module:
    """Put a config bound to ``model`` on ``model.config`` (``afm.convert`` does it), so
    ``save_pretrained`` writes the analog layers as they are when it is called."""
    model.config.quantization_config = AfmQuantizationConfig.bound_to(model)
    return model


def is_afm_checkpoint_config(config: Any) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == QUANT_METHOD


def _register() -> None:
    # Registering twice raises in transformers (e.g. on importlib.reload): guard.
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AfmQuantizationConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AfmHfQuantizer


_register()

__all__ = [
    "AfmHfQuantizer",
    "AfmQuantizationConfig",
    "attach_quantization_config",
    "is_afm_checkpoint_config",
]
