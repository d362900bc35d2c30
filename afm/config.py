"""The hardware model as frozen dataclasses (spec: hardware-model.md §1-4).

Conventions: "off" is ``None`` (never -1); noise and clipping magnitudes are
relative to the quantity named in the field's docstring; every invalid value
raises ``ValueError`` naming the field and the value.  Variants are made with
``dataclasses.replace``.  ``AnalogConfig.to_dict`` / ``from_dict`` round-trip
exactly through JSON and carry a ``version``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from afm.validation import check_bits, check_bool, check_int, check_real, coerce_enum, fail

CONFIG_VERSION = 1


class WeightNoiseKind(str, Enum):
    """Additive weight noise during training (spec §3)."""

    NONE = "none"
    ADD_GAUSS = "add_gauss"  # std relative to the tile's max |W|
    ADD_GAUSS_PER_CHANNEL = "add_gauss_per_channel"  # std relative to the row's max |W|


class ClipKind(str, Enum):
    """Weight clipping after optimizer steps (spec §3)."""

    NONE = "none"
    GAUSSIAN = "gaussian"  # ±sigma·std(W) over the whole matrix
    GAUSSIAN_PER_CHANNEL = "gaussian_per_channel"  # ±sigma·std(W_row) per output row


class BoundManagement(str, Enum):
    """What the ADC does about outputs past its bound (spec §4.3)."""

    NONE = "none"  # saturate (clip at ±B, no gradient past it)
    ITERATIVE = "iterative"  # re-run the token with inputs halved until nothing saturates


class Backend(str, Enum):
    """Which implementation runs the analog forward."""

    AUTO = "auto"  # triton for CUDA tensors, numba on CPU, when they import; else torch
    TORCH = "torch"
    TRITON = "triton"
    NUMBA = "numba"  # the torch path with its elementwise chains fused (CPU)


@dataclass(frozen=True)
class InputQuantConfig:
    """DAC: per-tile input clipping and quantization (spec §2)."""

    bits: int | None = 8
    """Input bits; ``n = 2**bits - 2`` steps.  None: no quantization."""
    learn_ranges: bool = True
    """Clip to a learned per-tile range ``r`` (a parameter).  False: no clipping."""
    init_steps: int = 500
    """Calibration batches for the data-driven range initialisation (§2.4)."""
    init_std_alpha: float = 18.0
    """α in ``r ← mean(α·std(x))`` during initialisation."""
    init_value: float = 3.0
    """Value of ``r`` before any calibration."""
    decay: float = 0.01
    """Input-range decay (shrinks r when almost nothing clips)."""
    min_fraction: float = 0.95
    """Decay acts only while more than this fraction of inputs is not clipped."""
    dynamic: bool = False
    """Per-token abs-max range instead of a learned one (no learning, no clipping)."""

    def __post_init__(self) -> None:
        owner = "InputQuantConfig"
        check_bits(owner, "bits", self.bits)
        check_bool(owner, "learn_ranges", self.learn_ranges)
        check_bool(owner, "dynamic", self.dynamic)
        check_int(owner, "init_steps", self.init_steps, minimum=0)
        check_real(owner, "init_std_alpha", self.init_std_alpha, strict=True)
        check_real(owner, "init_value", self.init_value, strict=True)
        check_real(owner, "decay", self.decay)
        check_real(owner, "min_fraction", self.min_fraction, maximum=1.0)
        if self.dynamic and self.learn_ranges:
            fail(
                owner,
                "dynamic",
                self.dynamic,
                "dynamic ranges cannot be combined with learn_ranges=True",
            )
        if self.dynamic and self.bits is None:
            fail(owner, "dynamic", self.dynamic, "dynamic ranges need input bits")

    @property
    def uses_range(self) -> bool:
        """Whether layers carry a static per-tile ``input_range``."""
        return self.learn_ranges and not self.dynamic


@dataclass(frozen=True)
class OutputQuantConfig:
    """ADC: per-tile output quantization with a global bound (spec §4.2-4.3)."""

    bits: int | None = 8
    bound: float | None = 14.0
    """B = bound · r · a, in units of input range times weight range."""
    per_channel: bool | None = None
    """a of the bound: the channel's max|W| (True, aihwkit's column-wise weight mapping),
    the tile's max|W| (False), or None: per channel exactly when clipping is per channel."""
    bound_management: BoundManagement = BoundManagement.NONE
    """``iterative``: aihwkit's ``BoundManagementType.ITERATIVE`` (needs dynamic inputs)."""
    max_bm_factor: int = 1000
    """Iterative bound management stops once the input reduction exceeds this."""
    max_bm_res: float = 0.25
    """... or exceeds ``max_bm_res / (2 / n_in)`` (the input step; aihwkit's defaults)."""

    def __post_init__(self) -> None:
        owner = "OutputQuantConfig"
        check_bits(owner, "bits", self.bits)
        if self.per_channel is not None:
            check_bool(owner, "per_channel", self.per_channel)
        object.__setattr__(
            self,
            "bound_management",
            coerce_enum(owner, "bound_management", BoundManagement, self.bound_management),
        )
        check_int(owner, "max_bm_factor", self.max_bm_factor, minimum=1)
        check_real(owner, "max_bm_res", self.max_bm_res, strict=True)
        if self.bound is not None:
            check_real(owner, "bound", self.bound, strict=True)
            if self.bits is None:
                fail(owner, "bound", self.bound, "a bound needs output bits (bits is None)")
        elif self.bits is not None:
            fail(owner, "bound", self.bound, "output bits need a bound")
        if self.bound_management is not BoundManagement.NONE and self.bits is None:
            fail(owner, "bound_management", self.bound_management.value, "needs an ADC (bits)")


@dataclass(frozen=True)
class WeightNoiseConfig:
    """Additive Gaussian weight noise, resampled every training forward (spec §3)."""

    kind: WeightNoiseKind = WeightNoiseKind.NONE
    std: float = 0.0
    """Relative to max|W| of the row (per channel) or the tile."""
    keep_at_eval: bool = False

    def __post_init__(self) -> None:
        owner = "WeightNoiseConfig"
        object.__setattr__(self, "kind", coerce_enum(owner, "kind", WeightNoiseKind, self.kind))
        check_real(owner, "std", self.std)
        check_bool(owner, "keep_at_eval", self.keep_at_eval)
        if self.kind is WeightNoiseKind.NONE and self.std != 0:
            fail(owner, "std", self.std, "kind is 'none'; set a kind or std=0")
        if self.kind is not WeightNoiseKind.NONE and self.std == 0:
            fail(owner, "std", self.std, f"kind {self.kind.value!r} needs std > 0")

    @property
    def enabled(self) -> bool:
        return self.kind is not WeightNoiseKind.NONE


@dataclass(frozen=True)
class OutputNoiseConfig:
    """Gaussian noise added to every tile's output before the ADC (spec §4.1)."""

    std: float = 0.0
    """Relative to r · a (input range times the weight range)."""
    per_channel: bool = True
    """a = per-channel max|W| (True) or the tile's max|W| (False)."""
    keep_at_eval: bool = False
    """Also at inference (aihwkit's analog MVM adds its output noise in eval mode too)."""

    def __post_init__(self) -> None:
        check_real("OutputNoiseConfig", "std", self.std)
        check_bool("OutputNoiseConfig", "per_channel", self.per_channel)
        check_bool("OutputNoiseConfig", "keep_at_eval", self.keep_at_eval)


@dataclass(frozen=True)
class ClipConfig:
    """Weight clipping after every optimizer step (spec §3)."""

    kind: ClipKind = ClipKind.NONE
    sigma: float = 2.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", coerce_enum("ClipConfig", "kind", ClipKind, self.kind))
        check_real("ClipConfig", "sigma", self.sigma, strict=True)

    @property
    def per_channel(self) -> bool:
        return self.kind is ClipKind.GAUSSIAN_PER_CHANNEL


@dataclass(frozen=True)
class WeightQuantConfig:
    """Digital round-to-nearest weight fake-quantization (spec §3; W4 baselines)."""

    bits: int | None = None
    group_size: int | None = None
    """None: per output channel; else groups of this many inputs."""

    def __post_init__(self) -> None:
        check_bits("WeightQuantConfig", "bits", self.bits)
        if self.group_size is not None:
            check_int("WeightQuantConfig", "group_size", self.group_size, minimum=1)
            if self.bits is None:
                fail("WeightQuantConfig", "group_size", self.group_size, "needs bits")


_SECTIONS: dict[str, type] = {
    "input": InputQuantConfig,
    "output": OutputQuantConfig,
    "weight_noise": WeightNoiseConfig,
    "output_noise": OutputNoiseConfig,
    "clip": ClipConfig,
    "weight_quant": WeightQuantConfig,
}


@dataclass(frozen=True)
class AnalogConfig:
    """Everything an ``AnalogLinear`` simulates.  Defaults are the ``afm-paper`` chip."""

    input: InputQuantConfig = field(default_factory=InputQuantConfig)
    output: OutputQuantConfig = field(default_factory=OutputQuantConfig)
    weight_noise: WeightNoiseConfig = field(default_factory=WeightNoiseConfig)
    output_noise: OutputNoiseConfig = field(default_factory=OutputNoiseConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    weight_quant: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    max_input_size: int | None = None
    """Tile height M (crossbar rows).  None: one tile."""
    backend: Backend = Backend.AUTO

    def __post_init__(self) -> None:
        owner = "AnalogConfig"
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                fail(owner, name, value, f"must be a {cls.__name__}")
        object.__setattr__(self, "backend", coerce_enum(owner, "backend", Backend, self.backend))
        check_int(owner, "max_input_size", self.max_input_size, minimum=1, allow_none=True)
        if self.output.bits is not None and not (self.input.uses_range or self.input.dynamic):
            fail(
                owner,
                "output",
                self.output,
                "the ADC bound is relative to the input range: output quantization needs "
                "input.learn_ranges=True or input.dynamic=True",
            )
        if self.output_noise.std > 0 and not (self.input.uses_range or self.input.dynamic):
            fail(
                owner,
                "output_noise",
                self.output_noise,
                "output noise is relative to the input range: it needs input ranges",
            )
        if self.output.bound_management is not BoundManagement.NONE and not self.input.dynamic:
            fail(
                owner,
                "output",
                self.output,
                "bound management re-scales each token's dynamic input range: it needs "
                "input.dynamic=True (static learned ranges are not supported)",
            )

    def num_tiles(self, in_features: int) -> int:
        if self.max_input_size is None:
            return 1
        return max(1, math.ceil(in_features / self.max_input_size))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as strings) with a ``version`` field."""
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for name in _SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: (v.value if isinstance(v, Enum) else v) for k, v in section.items()}
        out["max_input_size"] = self.max_input_size
        out["backend"] = self.backend.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalogConfig:
        """Inverse of ``to_dict``; rejects unknown keys and newer versions."""
        if not isinstance(data, dict):
            raise ValueError(f"AnalogConfig.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"AnalogConfig: version={version!r} is invalid")
        if version > CONFIG_VERSION:
            raise ValueError(
                f"AnalogConfig: version={version} is newer than this afm understands "
                f"({CONFIG_VERSION}); upgrade afm to load it"
            )
        allowed = set(_SECTIONS) | {"max_input_size", "backend"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"AnalogConfig: unknown keys {unknown}; allowed: {sorted(allowed)}")
        kwargs: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            if name not in data:
                continue
            section = data[name]
            if not isinstance(section, dict):
                raise ValueError(f"AnalogConfig.{name}={section!r} is invalid: must be a dict")
            names = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(section) - names)
            if bad:
                raise ValueError(
                    f"AnalogConfig.{name}: unknown keys {bad}; allowed: {sorted(names)}"
                )
            kwargs[name] = section_cls(**section)
        for key in ("max_input_size", "backend"):
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> AnalogConfig:
        return dataclasses.replace(self, **changes)


def set_by_path(config: AnalogConfig, path: str, value: Any) -> AnalogConfig:
    """``set_by_path(cfg, "output.bound", 10.0)``: a validated copy with one field changed."""
    parts = path.split(".")
    if len(parts) == 1:
        if parts[0] not in ("max_input_size", "backend"):
            raise ValueError(f"AnalogConfig has no field {path!r}")
        return dataclasses.replace(config, **{parts[0]: value})
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise ValueError(f"AnalogConfig has no field {path!r}")
    section = getattr(config, parts[0])
    if parts[1] not in {f.name for f in dataclasses.fields(section)}:
        raise ValueError(f"AnalogConfig has no field {path!r}")
    return dataclasses.replace(
        config, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})}
    )
