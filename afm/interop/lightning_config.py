"""aihwkit-lightning's ``TorchInferenceRPUConfig`` → afm's ``AnalogConfig``, field by field.

:func:`read_rpu_fields` turns the unpickled stand-in (``afm.interop.unpickle``) into a
flat ``{"forward.inp_res": 254, "clip.type": "LayerGaussianPerChannel", ...}`` after
checking every class, field name, type and enum value; :func:`map_rpu_config` maps
those fields onto an ``AnalogConfig``.  The rules (docs/import.md has the table):

* every field aihwkit-lightning's forward, training step or calibration reads is
  mapped; a field afm does not model raises :class:`UnsupportedRpuConfig` naming it
  whenever its value would change what the layer does (a field that another field
  switches off, such as ``clip.sigma`` with ``clip.type`` None, is inert);
* fields missing from the pickle (older aihwkit-lightning versions) take that class's
  default, as the dataclass would; the deprecated ``modifier.type`` of version 1
  decides the noise and quantization types exactly as aihwkit-lightning 2 does
  (``AnalogLayerBase.deprecation_adjustment``);
* ``modifier.offset`` and ``pre_post.input_range.init_with_max`` are not dataclass
  fields but IBM's ``create_rpu_config`` sets them; their neutral values (0, False)
  are accepted, any other is refused.

Output noise: aihwkit-lightning's torch path divides ``forward.out_noise`` by
``√tiles`` (per layer); afm adds ``std·r·a`` on every tile, so a layer with S tiles
gets ``std = out_noise / √S`` (:meth:`LightningMapping.for_layer`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from afm.config import (
    AnalogConfig,
    ClipConfig,
    ClipKind,
    InputQuantConfig,
    OutputNoiseConfig,
    OutputQuantConfig,
    WeightNoiseConfig,
    WeightNoiseKind,
    WeightQuantConfig,
)
from afm.interop.unpickle import LIGHTNING_ENUMS, PickledEnum, PickledObject
from afm.reference import tile_bounds

__all__ = ["LightningMapping", "UnsupportedRpuConfig", "map_rpu_config", "read_rpu_fields"]

_ENUM_VALUES = {full.rpartition(".")[2]: values for full, values in LIGHTNING_ENUMS.items()}

#: section path -> (aihwkit-lightning class, {field: (kind, default)}); kind is
#: "number", "int", "bool" or an enum name.  Defaults are aihwkit-lightning 2.1's.
_SCHEMA: dict[str, tuple[str, dict[str, tuple[str, Any]]]] = {
    "forward": (
        "IOParameters",
        {
            "inp_res": ("number", -1),
            "out_noise": ("number", 0.0),
            "out_noise_per_channel": ("bool", False),
            "out_bound": ("number", 0.0),
            "out_res": ("number", -1),
        },
    ),
    "clip": (
        "WeightClipParameter",
        {"sigma": ("number", -1.0), "type": ("WeightClipType", "None")},
    ),
    "modifier": (
        "WeightModifierParameter",
        {
            "std_dev": ("number", 0.0),
            "res": ("number", 0.0),
            "enable_during_test": ("bool", False),
            "type": ("WeightModifierType", "None"),
            "noise_type": ("WeightNoiseInjectionType", "None"),
            "quantization_type": ("WeightQuantizationType", "None"),
            "offset": ("number", 0.0),  # set by IBM's create_rpu_config, not a field
        },
    ),
    "mapping": ("MappingParameter", {"max_input_size": ("int", -1)}),
    "pre_post.input_range": (
        "InputRangeParameter",
        {
            "fast_mode": ("bool", False),
            "act_range_momentum": ("number", 0.95),
            "enable": ("bool", False),
            "dynamic": ("bool", False),
            "learn_input_range": ("bool", True),
            "init_value": ("number", 3.0),
            "init_from_data": ("int", 100),
            "init_std_alpha": ("number", 3.0),
            "decay": ("number", 0.001),
            "input_min_percentage": ("number", 0.95),
            "init_with_max": ("bool", False),  # set by IBM's create_rpu_config
        },
    ),
}
#: Attributes IBM's ``create_rpu_config`` sets that the classes do not declare: never
#: "missing" when absent.
_NOT_DECLARED = frozenset({"modifier.offset", "pre_post.input_range.init_with_max"})
_TOP = ("TorchInferenceRPUConfig", ("forward", "clip", "modifier", "mapping", "pre_post"))

#: deprecated ``modifier.type`` -> (noise_type, quantization_type), as lightning 2 maps it
_MODIFIER_TYPE = {
    "Discretize": ("None", "Discretize"),
    "DiscretizePerChannel": ("None", "DiscretizePerChannel"),
    "AddNormal": ("AddNormal", "None"),
    "AddNormalPerChannel": ("AddNormalPerChannel", "None"),
    "DiscretizeAddNormal": ("AddNormal", "Discretize"),
    "DiscretizeAddNormalPerChannel": ("AddNormalPerChannel", "DiscretizePerChannel"),
}


class UnsupportedRpuConfig(ValueError):
    """An ``rpu_config`` field afm cannot represent (the message names it)."""


def _refuse(name: str, value: Any, why: str) -> None:
    raise UnsupportedRpuConfig(f"rpu_config: {name}={value!r} {why}")


# --------------------------------------------------------------------------- reading
def _section(obj: Any, path: str, expected: str) -> dict[str, Any]:
    if not isinstance(obj, PickledObject) or obj.class_name != expected:
        _refuse(path, obj, f"is not an aihwkit-lightning {expected}")
    return obj.fields


def _check_value(name: str, kind: str, value: Any) -> Any:
    if kind in _ENUM_VALUES:
        if not isinstance(value, PickledEnum) or value.enum != kind:
            _refuse(name, value, f"is not a {kind}")
        if value.value not in _ENUM_VALUES[kind]:
            _refuse(name, value.value, f"is not a {kind} this afm knows")
        return value.value
    if kind == "bool":
        if not isinstance(value, bool):
            _refuse(name, value, "must be a bool")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _refuse(name, value, "must be a finite number")
    if kind == "int":
        if value != int(value):
            _refuse(name, value, "must be an integer")
        return int(value)
    return value


def read_rpu_fields(rpu: PickledObject) -> tuple[dict[str, Any], list[str]]:
    """Flat ``{"section.field": value}`` (enums as their value strings) and the names of
    the fields absent from the pickle (they take aihwkit-lightning's defaults)."""
    top = _section(rpu, "rpu_config", _TOP[0])
    unknown = sorted(set(top) - set(_TOP[1]))
    if unknown:
        _refuse(unknown[0], top[unknown[0]], "is not a TorchInferenceRPUConfig field afm knows")
    pre_post = _section(top.get("pre_post"), "pre_post", "PrePostProcessingParameter")
    extra = sorted(set(pre_post) - {"input_range"})
    if extra:
        _refuse(f"pre_post.{extra[0]}", pre_post[extra[0]], "is not a field afm knows")
    objects = {name: top.get(name) for name in _TOP[1] if name != "pre_post"}
    objects["pre_post.input_range"] = pre_post.get("input_range")
    flat: dict[str, Any] = {}
    missing: list[str] = []
    for path, (cls, schema) in _SCHEMA.items():
        fields = _section(objects[path], path, cls)
        for name in sorted(set(fields) - set(schema)):
            _refuse(f"{path}.{name}", fields[name], f"is not a {cls} field afm knows")
        for name, (kind, default) in schema.items():
            key = f"{path}.{name}"
            if name in fields:
                flat[key] = _check_value(key, kind, fields[name])
            else:
                flat[key] = default
                if key not in _NOT_DECLARED:
                    missing.append(key)
    return flat, missing


# --------------------------------------------------------------------------- mapping
def _bits(name: str, res: float, *, required: bool = False) -> int | None:
    """Steps (``res > 1``) or resolution (``res ≤ 1``) → afm bits with ``n = 2^b - 2``;
    ``res ≤ 0`` is no quantization (refused when ``required``)."""
    if res <= 0:
        if required:
            _refuse(name, res, "must be > 0 for weight quantization")
        return None
    n = max(res, 1 / res)  # aihwkit-lightning reads both forms this way
    bits = round(math.log2(n + 2))
    if not (2 <= bits <= 16 and abs(n - (2**bits - 2)) <= 1e-6 * n):
        _refuse(name, res, "is not 2^b - 2 steps (254 for 8 bits, b = 2..16), all afm models")
    return bits


@dataclass(frozen=True)
class LightningMapping:
    """The afm config of every layer, from one aihwkit-lightning ``rpu_config``."""

    config: AnalogConfig
    """The config of a one-tile layer (``for_layer`` adjusts multi-tile layers)."""
    out_noise: float
    """aihwkit-lightning's ``forward.out_noise`` (before its ``1/√tiles``)."""
    fields: dict[str, Any]
    """The ``rpu_config`` fields, flat (see :func:`read_rpu_fields`)."""

    def for_layer(self, in_features: int) -> AnalogConfig:
        """A layer's config: output noise ``out_noise/√S`` and, with weight quantization,
        one scale per tile row (``group_size`` = the tile size) when it has S > 1 tiles."""
        cfg = self.config
        tiles = tile_bounds(in_features, cfg.max_input_size)
        if len(tiles) == 1:
            return cfg
        if self.out_noise > 0:
            noise = dataclasses.replace(
                cfg.output_noise, std=self.out_noise / math.sqrt(len(tiles))
            )
            cfg = dataclasses.replace(cfg, output_noise=noise)
        if cfg.weight_quant.bits is not None:
            sizes = sorted({hi - lo for lo, hi in tiles})
            if len(sizes) > 1:
                _refuse(
                    "modifier.quantization_type",
                    "DiscretizePerChannel",
                    f"scales per tile row; with mapping.max_input_size={cfg.max_input_size} a "
                    f"layer with {in_features} inputs has tiles of sizes {sizes}, and afm's "
                    "per-group weight quantization needs equal groups",
                )
            quant = dataclasses.replace(cfg.weight_quant, group_size=sizes[0])
            cfg = dataclasses.replace(cfg, weight_quant=quant)
        return cfg

    def with_ranges_calibrated(self) -> LightningMapping:
        """The same with ``init_steps=0``: the checkpoint's ranges are already initialised
        from data, so afm's trainer must not initialise them again."""
        inp = dataclasses.replace(self.config.input, init_steps=0)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, input=inp))


def _input_config(f: dict[str, Any]) -> InputQuantConfig:
    ir = "pre_post.input_range."
    bits = _bits("forward.inp_res", f["forward.inp_res"])
    if f[ir + "fast_mode"]:
        _refuse(ir + "fast_mode", True, "(min/max momentum ranges) is not modelled by afm")
    if f[ir + "init_with_max"]:
        _refuse(ir + "init_with_max", True, "(range init from the max) is not modelled by afm")
    if not f[ir + "enable"]:
        for name in (
            "forward.inp_res",
            "forward.out_res",
            "forward.out_bound",
            "forward.out_noise",
        ):
            if f[name] > 0:
                _refuse(
                    name,
                    f[name],
                    f"needs input ranges, but {ir}enable=False (aihwkit-lightning cannot run "
                    "this config either)",
                )
        return InputQuantConfig(bits=None, learn_ranges=False, init_steps=0)
    if f[ir + "dynamic"]:
        if bits is None:
            _refuse(ir + "dynamic", True, "needs input quantization in afm (forward.inp_res > 0)")
        return InputQuantConfig(bits=bits, learn_ranges=False, dynamic=True, init_steps=0)
    if not f[ir + "learn_input_range"]:
        _refuse(
            ir + "learn_input_range",
            False,
            "(static ranges that are not trained) is not modelled by afm, which learns "
            "every static input range it simulates",
        )
    return InputQuantConfig(
        bits=bits,
        learn_ranges=True,
        init_steps=f[ir + "init_from_data"],
        init_std_alpha=float(f[ir + "init_std_alpha"]),
        init_value=float(f[ir + "init_value"]),
        decay=float(f[ir + "decay"]),
        min_fraction=float(f[ir + "input_min_percentage"]),
    )


def _output_config(f: dict[str, Any]) -> OutputQuantConfig:
    bits, bound = _bits("forward.out_res", f["forward.out_res"]), f["forward.out_bound"]
    if bits is not None:
        if bound <= 0:
            _refuse("forward.out_bound", bound, "must be > 0 with output quantization")
        return OutputQuantConfig(bits=bits, bound=float(bound))
    if bound > 0:
        _refuse(
            "forward.out_bound",
            bound,
            "without forward.out_res (a clamp-only ADC) is not modelled by afm, whose ADC "
            "always quantizes",
        )
    return OutputQuantConfig(bits=None, bound=None)


def _clip_config(f: dict[str, Any]) -> ClipConfig:
    kind, sigma = f["clip.type"], f["clip.sigma"]
    if kind == "None":
        return ClipConfig(ClipKind.NONE)  # clip.sigma is inert
    if kind == "LearnablePerChannel":
        _refuse("clip.type", kind, "(learned clipping ranges) is not modelled by afm")
    if sigma <= 0:
        _refuse("clip.sigma", sigma, f"must be > 0 with clip.type={kind!r}")
    per_channel = kind == "LayerGaussianPerChannel"
    return ClipConfig(ClipKind.GAUSSIAN_PER_CHANNEL if per_channel else ClipKind.GAUSSIAN, sigma)


def _modifier_configs(f: dict[str, Any]) -> tuple[WeightNoiseConfig, WeightQuantConfig]:
    if f["modifier.enable_during_test"]:
        _refuse(
            "modifier.enable_during_test",
            True,
            "is deprecated: aihwkit-lightning 2 switches it off, version 1 kept weight noise "
            "on at eval; afm does not guess which one the model was evaluated with",
        )
    if f["modifier.offset"] != 0:
        _refuse("modifier.offset", f["modifier.offset"], "(a weight offset) is not modelled by afm")
    noise, quant = f["modifier.noise_type"], f["modifier.quantization_type"]
    noise, quant = _MODIFIER_TYPE.get(f["modifier.type"], (noise, quant))
    std = f["modifier.std_dev"]
    if std < 0:
        _refuse("modifier.std_dev", std, "must be >= 0")
    weight_noise = WeightNoiseConfig()  # noise type None, or std 0: no noise either way
    if noise != "None" and std > 0:
        per_channel = noise == "AddNormalPerChannel"
        kind = WeightNoiseKind.ADD_GAUSS_PER_CHANNEL if per_channel else WeightNoiseKind.ADD_GAUSS
        weight_noise = WeightNoiseConfig(kind, std=float(std))
    if quant == "None":
        return weight_noise, WeightQuantConfig()  # modifier.res is inert
    if quant == "Discretize":
        _refuse(
            "modifier.quantization_type",
            quant,
            "(one weight scale per tile) is not modelled by afm; DiscretizePerChannel is",
        )
    return weight_noise, WeightQuantConfig(
        bits=_bits("modifier.res", f["modifier.res"], required=True)
    )


def map_rpu_config(fields: dict[str, Any]) -> LightningMapping:
    """The afm hardware model equivalent to aihwkit-lightning's (``read_rpu_fields`` output)."""
    out_noise = fields["forward.out_noise"]
    if out_noise < 0:
        _refuse("forward.out_noise", out_noise, "must be >= 0")
    weight_noise, weight_quant = _modifier_configs(fields)
    size = fields["mapping.max_input_size"]
    try:
        config = AnalogConfig(
            input=_input_config(fields),
            output=_output_config(fields),
            weight_noise=weight_noise,
            output_noise=OutputNoiseConfig(  # per_channel is inert without noise
                std=float(out_noise), per_channel=fields["forward.out_noise_per_channel"]
            )
            if out_noise > 0
            else OutputNoiseConfig(),
            clip=_clip_config(fields),
            weight_quant=weight_quant,
            max_input_size=size if size > 0 else None,
        )
    except UnsupportedRpuConfig:
        raise
    except ValueError as err:  # afm's own validation of the mapped values
        raise UnsupportedRpuConfig(f"rpu_config maps to an invalid afm config: {err}") from None
    return LightningMapping(config=config, out_noise=float(out_noise), fields=dict(fields))
