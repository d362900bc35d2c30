"""transformers integration: quantization method "afm".

After ``import afm``, ``model.save_pretrained(dir)`` of a converted model writes its
hardware config into ``config.json`` (``quantization_config.quant_method == "afm"``)
and ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the analog layers on the
meta device before the weights (and ``input_range`` tensors) are loaded.  A plain
checkpoint can be converted on the fly with
``from_pretrained(dir, quantization_config=AfmQuantizationConfig(config))``.

There is no plugin discovery in transformers: without ``import afm`` it only logs
"Unknown quantization type" and loads plain Linear layers.  afm's own loaders
(``afm.models.load_model``) always import it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.select import is_linear_like, name_matches, set_module
from afm.config import CONFIG_VERSION, AnalogConfig
from afm.presets import get_preset

logger = logging.getLogger(__name__)

QUANT_METHOD = "afm"
_KNOWN_KEYS = {"quant_method", "version", "config", "modules", "overrides", "convert_lm_head"}


class AfmQuantizationConfig(QuantizationConfigMixin):
    """The afm hardware model as a transformers quantization config.

    Args:
        config: the default ``AnalogConfig`` (or its dict, or a preset name).
        modules: qualified names of the analog layers; None converts every linear
            layer except the output head (used when converting a plain checkpoint).
        overrides: ``{module name: AnalogConfig dict}`` for layers whose config differs.
        convert_lm_head: with ``modules=None``, also make the output head analog.
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
        self.quant_method = QUANT_METHOD
        self.version = version
        if config is None:
            config = get_preset("afm-paper")
        elif isinstance(config, str):
            config = get_preset(config)
        elif isinstance(config, dict):
            config = AnalogConfig.from_dict(config)
        elif not isinstance(config, AnalogConfig):
            raise ValueError(f"afm quantization_config: config={config!r} is invalid")
        self.analog_config = config
        if modules is not None and (
            not isinstance(modules, list) or not all(isinstance(m, str) for m in modules)
        ):
            raise ValueError(
                f"afm quantization_config: modules={modules!r} must be a list of names"
            )
        self.modules = modules
        self.overrides = {
            k: AnalogConfig.from_dict(v) if isinstance(v, dict) else v
            for k, v in (overrides or {}).items()
        }
        for k, v in self.overrides.items():
            if not isinstance(v, AnalogConfig):
                raise ValueError(f"afm quantization_config: overrides[{k!r}]={v!r} is invalid")
        self.convert_lm_head = bool(convert_lm_head)

    @classmethod
    def from_model(cls, model: nn.Module) -> AfmQuantizationConfig:
        """Describe a model converted in memory (its analog layers and their configs)."""
        layers = analog_layers(model)
        if not layers:
            raise ValueError("the model has no AnalogLinear layers; call afm.convert first")
        configs = [layer.analog_config for layer in layers.values()]
        default = max(set(configs), key=configs.count)
        overrides = {
            n: layer.analog_config.to_dict()
            for n, layer in layers.items()
            if layer.analog_config != default
        }
        return cls(default, modules=sorted(layers), overrides=overrides)

    def config_for(self, name: str) -> AnalogConfig:
        return self.overrides.get(name, self.analog_config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "config": self.analog_config.to_dict(),
            "modules": self.modules,
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
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

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qc: AfmQuantizationConfig = self.quantization_config
        for name in self._target_modules(model):
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
            # Converting a plain checkpoint: input_range is not in it.
            ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            model._keys_to_ignore_on_load_missing = ignore + [r"\.input_range$"]
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            for layer in analog_layers(model).values():
                layer.input_range.data.fill_(layer.analog_config.input.init_value)
        for layer in analog_layers(model).values():
            layer.input_range.data = layer.input_range.data.float()
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
    """Record the analog layers in ``model.config`` so ``save_pretrained`` writes them."""
    model.config.quantization_config = AfmQuantizationConfig.from_model(model)
    return model


def read_quantization_config(path: str | Path) -> AfmQuantizationConfig:
    """The afm config in a JSON file: a placement written by ``afm-plan place`` (the bare
    ``quantization_config`` mapping) or an afm checkpoint's ``config.json`` (its
    ``quantization_config`` entry).  Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"afm config file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"afm config file {str(p)!r} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("quantization_config"), dict):
        data = data["quantization_config"]
    if not isinstance(data, dict) or data.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"afm config file {str(p)!r} holds no afm quantization_config "
            "(expected a mapping with quant_method 'afm')"
        )
    try:
        return AfmQuantizationConfig(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"afm config file {str(p)!r}: {err}") from None


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
    "read_quantization_config",
]
