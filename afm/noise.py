"""Deployment (inference-time) noise: program a trained model onto a simulated chip.

Spec: ``hardware-model.md`` §5.  A noise model is a frozen dataclass with one pure
method, ``perturb_weight(weight, generator) -> Tensor``; ``apply_noise_`` applies it
once to the linear layers of a model (in place, reversibly) and ``apply_noise`` to a
copy.  Three models:

* ``PCMProgrammingNoise`` ("pcm", §5a) — the AFM paper's evaluation model.
* ``GaussianWeightNoise`` ("gaussian") — additive ``std · max|W_row| · ξ``.
* ``PCMDriftNoise`` ("pcm-drift", §5b) — PCM-like programming noise, conductance
  drift, 1/f read noise at time ``t_inference`` and global drift compensation.

Randomness: every layer gets its own ``torch.Generator`` seeded from
``layer_seed(seed, module_name)``, so a layer's noise does not depend on the order in
which layers are visited or on which other layers are selected.  For the same seed,
``PCMDriftNoise`` draws the programming noise and drift exponents first, so the same
seed at different ``t_inference`` is the same programmed chip read at different times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import operator
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from afm.reference import tile_bounds

__all__ = [
    "NoiseModel",
    "PCMProgrammingNoise",
    "GaussianWeightNoise",
    "PCMDriftNoise",
    "PCMDeviceState",
    "NoiseHandle",
    "NOISE_MODELS",
    "DRIFT_TIMES",
    "get_noise_model",
    "noise_model_from_dict",
    "parse_duration",
    "format_duration",
    "layer_seed",
    "select_noise_layers",
    "apply_noise_",
    "apply_noise",
    "tile_bounds",
]

logger = logging.getLogger(__name__)

# §5a constants (AFM paper), copied exactly from the spec.
PCM_G_MAX = 180.0
PCM_FIT_SPLIT = 52.5
PCM_ZERO_BELOW = 0.6
PCM_OD_COEFFS = (
    2.939751381126213e-05,
    -0.00371581208142707,
    0.22419685954327148,
    2.5797410660159494,
)  # c3, c2, c1, c0; used where |G| <= 52.5
PCM_TD_COEFFS = (
    1.2329755395573392e-05,
    -0.003054993405157235,
    0.2453487119885723,
    2.110295720240385,
)  # c3, c2, c1, c0; used where |G| > 52.5

# §5b constants (Nandakumar et al. 2019), in µS for g_max = 25.
DRIFT_PROG_COEFFS = (0.26348, 1.9650, -1.1731)  # c0, c1, c2 of ĝ
DRIFT_G_MIN_REL = 1e-7
_PROBE_SEED = 0x5EED  # the fixed probe of the drift compensation
_PROBE_SIZE = 64


def _fail(owner: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: {why}")


def _check_real(owner: str, name: str, value: Any, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(owner, name, value, "must be a number")
    if not math.isfinite(value):
        _fail(owner, name, value, "must be finite")
    if strict and value <= 0:
        _fail(owner, name, value, "must be > 0")
    if value < 0:
        _fail(owner, name, value, "must be >= 0")


def _check_tile_size(owner: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(owner, "tile_size", value, "must be a positive int or None (one tile)")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "must be a bool")


# --------------------------------------------------------------------------- durations
_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "mo": 30 * 86400.0,
    "y": 365 * 86400.0,
}
_DURATION_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)$")

#: The evaluation times of spec §5b (month = 30 days, year = 365 days).
DRIFT_TIMES: dict[str, float] = {
    "0s": 0.0,
    "1h": 3600.0,
    "1d": 86400.0,
    "1w": 604800.0,
    "1mo": 2592000.0,
    "1y": 31536000.0,
    "10y": 315360000.0,
}


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``"1h"``, ``"1d"``, ``"1w"``, ``"1mo"``, ``"1y"``, ``"10y"``, ``"90min"``,
    ``"3600"`` or ``"0s"`` (units s, min, h, d, w, mo = 30 d, y = 365 d); numbers pass
    through.  Raises ``ValueError`` naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '1h'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value.strip().lower())
        if m is None or m.group(2) not in _UNITS:
            hint = " ('m' is ambiguous: use 'min' or 'mo')" if m and m.group(2) == "m" else ""
            raise ValueError(
                f"invalid duration {value!r}{hint}: expected a non-negative number with an "
                f"optional unit s, min, h, d, w, mo, y (e.g. '1h', '10y', '3600')"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '1h'")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be finite and >= 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """Short label: the ``DRIFT_TIMES`` name when there is one, else e.g. ``'90s'``."""
    for name, value in DRIFT_TIMES.items():
        if value == seconds:
            return name
    return f"{seconds:g}s"


# --------------------------------------------------------------------------- helpers
def _row_abs_max(w: Tensor, tile_size: int | None, per_channel: bool = True) -> Tensor:
    """``a[s, i]`` (per row inside each tile) or ``a[s]``, broadcastable to ``w``.

    One tile gives an [N_out, 1] (or [1, 1]) tensor; several tiles an [N_out, K] one.
    """
    bounds = tile_bounds(w.shape[1], tile_size)
    parts = []
    for start, end in bounds:
        chunk = w[:, start:end]
        amax = chunk.abs().amax(dim=1, keepdim=True) if per_channel else chunk.abs().amax()
        parts.append(amax.reshape(-1, 1))
    if len(parts) == 1:
        return parts[0]
    sizes = torch.tensor([end - start for start, end in bounds], device=w.device)
    return torch.cat(parts, dim=1).repeat_interleave(sizes, dim=1).expand(w.shape[0], -1)


def _nonzero(amax: Tensor) -> Tensor:
    """``amax`` with zeros replaced by 1 (an all-zero row maps to G = 0 and stays 0)."""
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def _as_fp32_matrix(weight: Tensor, owner: str) -> Tensor:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{owner}.perturb_weight expects a 2-D weight [N_out, K], got "
            f"{getattr(weight, 'shape', type(weight).__name__)}"
        )
    if not weight.is_floating_point():
        raise ValueError(
            f"{owner}.perturb_weight expects a floating-point weight, got {weight.dtype}"
        )
    if weight.device.type == "meta":
        raise ValueError(
            f"{owner}.perturb_weight: the weight is on the meta device "
            f"(offloaded?); load it before applying noise"
        )
    return weight.detach().to(torch.float32)


def _randn(like: Tensor, generator: torch.Generator, *shape: int) -> Tensor:
    size = shape or tuple(like.shape)
    return torch.randn(size, generator=generator, device=like.device, dtype=torch.float32)


def _poly3(coeffs: tuple[float, float, float, float], x: Tensor) -> Tensor:
    c3, c2, c1, c0 = coeffs
    return ((c3 * x + c2) * x + c1) * x + c0


def pcm_sigma(g_abs: Tensor) -> Tensor:
    """σ of the §5a programming noise at conductance ``|G|`` (OD fit ≤ 52.5 < TD fit)."""
    return torch.where(
        g_abs <= PCM_FIT_SPLIT, _poly3(PCM_OD_COEFFS, g_abs), _poly3(PCM_TD_COEFFS, g_abs)
    )


# --------------------------------------------------------------------------- models
class NoiseModel:
    """Common interface of the deployment noise models (all are frozen dataclasses)."""

    name: ClassVar[str] = ""

    def perturb_weight(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        """A new noisy copy of ``weight`` ([N_out, K]); computed in fp32, same dtype out."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the registry ``name``; inverse of ``noise_model_from_dict``."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseModel:
        return noise_model_from_dict(data)

    @property
    def label(self) -> str:
        """A short human-readable label for tables and plots."""
        defaults = type(self)()
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return self.name + (f"({', '.join(changed)})" if changed else "")


@dataclass(frozen=True)
class PCMProgrammingNoise(NoiseModel):
    """AFM PCM programming noise (spec §5a).

    Per row (inside each input tile of ``tile_size`` inputs, ``None`` = whole row):
    ``G = 180 W / max|W|``, ``G' = G + scale · p(|G|) · ξ``, ``G' = 0`` where
    ``|G| < 0.6``, ``W' = G' max|W| / 180``.
    """

    name: ClassVar[str] = "pcm"
    scale: float = 1.0
    tile_size: int | None = 512

    def __post_init__(self) -> None:
        _check_real(type(self).__name__, "scale", self.scale)
        _check_tile_size(type(self).__name__, self.tile_size)

    def perturb_weight(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        w = _as_fp32_matrix(weight, type(self).__name__)
        amax = _row_abs_max(w, self.tile_size)
        g = w * (PCM_G_MAX / _nonzero(amax))
        g_abs = g.abs()
        noise = _randn(w, generator).mul_(pcm_sigma(g_abs)).mul_(self.scale)
        g_noisy = g.add_(noise).masked_fill_(g_abs < PCM_ZERO_BELOW, 0.0)
        return g_noisy.mul_(amax / PCM_G_MAX).to(weight.dtype)


@dataclass(frozen=True)
class GaussianWeightNoise(NoiseModel):
    """Additive Gaussian noise ``W' = W + scale · std · a · ξ``.

    ``a`` is ``max|W_row|`` inside each tile (``per_channel=True``) or the tile's max
    (``per_channel=False``); ``tile_size=None`` means one tile.
    """

    name: ClassVar[str] = "gaussian"
    std: float = 0.05
    scale: float = 1.0
    tile_size: int | None = None
    per_channel: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_real(owner, "std", self.std)
        _check_real(owner, "scale", self.scale)
        _check_tile_size(owner, self.tile_size)
        _check_bool(owner, "per_channel", self.per_channel)

    def perturb_weight(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        w = _as_fp32_matrix(weight, type(self).__name__)
        amax = _row_abs_max(w, self.tile_size, self.per_channel)
        noise = _randn(w, generator).mul_(amax).mul_(self.scale * self.std)
        return noise.add_(w).to(weight.dtype)


@dataclass
class PCMDeviceState:
    """Programmed differential pairs of one weight matrix (all tensors [N_out, K], fp32).

    ``g_plus``/``g_minus``: programmed conductances (µS); ``g_target_*``: their targets;
    ``nu_plus``/``nu_minus``: drift exponents; ``amax``: the weight that maps to g_max.
    """

    g_plus: Tensor
    g_minus: Tensor
    g_target_plus: Tensor
    g_target_minus: Tensor
    nu_plus: Tensor
    nu_minus: Tensor
    amax: Tensor


@dataclass(frozen=True)
class PCMDriftNoise(NoiseModel):
    """PCM-like statistical model with drift (spec §5b, Nandakumar et al. 2019).

    Each weight is a differential pair ``(g+, g-)``; ``|W|`` maps to ``g_max`` at the
    row's (``per_channel``) or tile's max inside each tile of ``tile_size`` inputs.
    Programming noise, drift ``((t + t0)/t0)^-ν`` and 1/f read noise at
    ``t = t_inference`` seconds (a number or a duration string such as ``"1y"``).
    ``scale`` multiplies the programming and read noise σ, ``read_noise_scale`` the read
    noise alone, ``drift_scale`` the drift exponents.  With ``compensation`` the layer's
    weights are multiplied by ``r0 / r(t)``, ``r = mean|probe · Wᵀ|`` (``probe``:
    ``"identity"`` or a fixed seeded ``"random"`` Gaussian probe).
    """

    name: ClassVar[str] = "pcm-drift"
    t_inference: float = 0.0
    compensation: bool = True
    scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0
    g_max: float = 25.0
    t0: float = 20.0
    t_read: float = 250e-9
    tile_size: int | None = None
    per_channel: bool = True
    probe: str = "identity"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if isinstance(self.t_inference, str):
            object.__setattr__(self, "t_inference", parse_duration(self.t_inference))
        _check_real(owner, "t_inference", self.t_inference)
        object.__setattr__(self, "t_inference", float(self.t_inference))
        _check_bool(owner, "compensation", self.compensation)
        for name in ("scale", "read_noise_scale", "drift_scale"):
            _check_real(owner, name, getattr(self, name))
        for name in ("g_max", "t0", "t_read"):
            _check_real(owner, name, getattr(self, name), strict=True)
        _check_tile_size(owner, self.tile_size)
        _check_bool(owner, "per_channel", self.per_channel)
        if self.probe not in ("identity", "random"):
            _fail(owner, "probe", self.probe, "must be 'identity' or 'random'")

    # -- device physics ----------------------------------------------------------------
    def drift_exponent_stats(self, g_target: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ_ν, σ_ν)`` at target conductance ``g_target`` (µS), before ``|·|``."""
        log_g = torch.log((g_target / self.g_max).clamp_min(DRIFT_G_MIN_REL))
        mu = (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1)
        sigma = (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)
        return mu, sigma

    def program(self, weight: Tensor, generator: torch.Generator) -> PCMDeviceState:
        """Program the pairs: targets, programming noise (clamped at 0), drift exponents."""
        w = _as_fp32_matrix(weight, type(self).__name__)
        amax = _row_abs_max(w, self.tile_size, self.per_channel)
        g_target = self.g_max * w.abs() / _nonzero(amax)
        zero = torch.zeros_like(g_target)
        targets = torch.stack(
            [torch.where(w > 0, g_target, zero), torch.where(w < 0, g_target, zero)]
        )
        c0, c1, c2 = DRIFT_PROG_COEFFS
        g_rel = targets / self.g_max
        sigma_prog = (c0 + c1 * g_rel + c2 * g_rel**2) * (self.g_max / 25.0)
        g_prog = targets + self.scale * sigma_prog * _randn(w, generator, *targets.shape)
        g_prog = g_prog.clamp_min(0.0)
        mu, sigma = self.drift_exponent_stats(targets)
        nu = (mu + sigma * _randn(w, generator, *targets.shape)).abs() * self.drift_scale
        return PCMDeviceState(
            g_plus=g_prog[0],
            g_minus=g_prog[1],
            g_target_plus=targets[0],
            g_target_minus=targets[1],
            nu_plus=nu[0],
            nu_minus=nu[1],
            amax=amax,
        )

    def read_noise_sigma(self, g_prog: Tensor, t: float) -> Tensor:
        """Relative 1/f read-noise σ at time ``t`` (zero when ``(t+t_read)/(2 t_read) ≤ 1``)."""
        arg = (t + self.t_read) / (2.0 * self.t_read)
        if arg <= 1.0:
            return torch.zeros_like(g_prog)
        q = (0.0088 / ((g_prog / self.g_max) ** 0.65).clamp_min(1e-3)).clamp_max(0.2)
        return q * math.sqrt(math.log(arg))

    def conductances_at(
        self, state: PCMDeviceState, t: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``(g+, g-)`` read at ``t`` seconds after programming: drift, then read noise."""
        t = parse_duration(t)
        out = []
        for g_prog, nu in ((state.g_plus, state.nu_plus), (state.g_minus, state.nu_minus)):
            g = g_prog * ((t + self.t0) / self.t0) ** (-nu) if t > 0 else g_prog.clone()
            sigma = self.read_noise_sigma(g_prog, t) * (self.scale * self.read_noise_scale)
            if t > 0 and bool((sigma > 0).any()):
                g = (g + g.abs() * sigma * _randn(g, generator)).clamp_min(0.0)
            out.append(g)
        return out[0], out[1]

    def to_weight(self, g_plus: Tensor, g_minus: Tensor, amax: Tensor) -> Tensor:
        return (g_plus - g_minus) * (amax / self.g_max)

    def readout(self, weight: Tensor) -> Tensor:
        """``r = mean|probe · Wᵀ|`` for the drift compensation (a 0-d tensor)."""
        if self.probe == "identity":
            return weight.abs().mean()
        gen = torch.Generator(device=weight.device).manual_seed(_PROBE_SEED)
        x = torch.randn(_PROBE_SIZE, weight.shape[1], generator=gen, device=weight.device)
        return (x @ weight.t()).abs().mean()

    def perturb_weight(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        state = self.program(weight, generator)
        w_t = self.to_weight(*self.conductances_at(state, self.t_inference, generator), state.amax)
        if self.compensation and self.t_inference > 0:
            r0 = self.readout(self.to_weight(state.g_plus, state.g_minus, state.amax))
            r_t = self.readout(w_t)
            if bool(r_t > 0):
                w_t = w_t * (r0 / r_t)
        return w_t.to(weight.dtype)


# --------------------------------------------------------------------------- registry
NOISE_MODELS: dict[str, type[NoiseModel]] = {
    PCMProgrammingNoise.name: PCMProgrammingNoise,
    GaussianWeightNoise.name: GaussianWeightNoise,
    PCMDriftNoise.name: PCMDriftNoise,
}


def get_noise_model(name: str, **kwargs: Any) -> NoiseModel:
    """``get_noise_model("pcm", scale=2.0)``; names: ``"pcm"``, ``"gaussian"``, ``"pcm-drift"``."""
    cls = NOISE_MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown noise model {name!r}; choose one of {sorted(NOISE_MODELS)}")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"noise model {name!r}: unknown options {unknown}; allowed: {sorted(fields)}"
        )
    return cls(**kwargs)


def noise_model_from_dict(data: dict[str, Any]) -> NoiseModel:
    """Inverse of ``NoiseModel.to_dict``: ``{"name": "pcm", "scale": 2.0, ...}``."""
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"noise model dict needs a 'name' key, got {data!r}")
    data = dict(data)
    return get_noise_model(data.pop("name"), **data)


# --------------------------------------------------------------------------- model level
def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name``, stable across runs and Python versions."""
    digest = hashlib.sha256(f"afm-noise:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _patterns(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or re.search(p, name) for p in patterns)


def _is_conv1d(module: nn.Module) -> bool:
    utils = sys.modules.get("transformers.pytorch_utils")  # imported iff a GPT-2 is loaded
    return utils is not None and isinstance(module, getattr(utils, "Conv1D", ()))


def select_noise_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_lm_head: bool = True,
    only_analog: bool = False,
    skip_adapters: bool = True,
) -> dict[str, nn.Module]:
    """The layers ``apply_noise_`` perturbs: every ``nn.Linear`` (and GPT-2 ``Conv1D``)
    except the LM head and peft adapter layers (``lora_*``, digital in AHWA-LoRA).

    ``include``/``exclude``: module names or regular expressions searched in the name
    (use ``^...$`` for an exact match); ``only_analog``: only ``afm.layers.AnalogLinear``.
    """
    inc, exc = _patterns(include), _patterns(exclude)
    analog_cls: Any = None
    if only_analog:
        try:
            analog_cls = importlib.import_module("afm.layers").AnalogLinear
        except (ImportError, AttributeError) as err:
            raise ImportError(
                "only_analog=True needs afm.layers.AnalogLinear, which could "
                f"not be imported: {err}"
            ) from err
    head: nn.Module | None = None
    if skip_lm_head and hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            head = None
    selected: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        if analog_cls is not None and not isinstance(module, analog_cls):
            continue
        if skip_lm_head and (module is head or name.rsplit(".", 1)[-1] == "lm_head"):
            continue
        if skip_adapters and any(part.startswith("lora_") for part in name.split(".")):
            continue
        if inc is not None and not _matches(name, inc):
            continue
        if exc is not None and _matches(name, exc):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            logger.warning("apply_noise_: skipping %s (weight is not a floating tensor)", name)
            continue
        selected[name] = module
    return selected


@dataclass
class _Saved:
    module: nn.Module
    param: nn.Parameter  # the original Parameter object
    original: Tensor | None  # CPU copy (None when untied: ``param`` itself is untouched)
    untied: bool


class NoiseHandle:
    """Returned by ``apply_noise_``; ``restore()`` puts the original weights back bitwise
    (and re-ties weights that were untied).  Also a context manager."""

    def __init__(self, saved: dict[str, _Saved], noise_model: NoiseModel, seed: int) -> None:
        self._saved = saved
        self.noise_model = noise_model
        self.seed = seed
        self.restored = False

    @property
    def layer_names(self) -> list[str]:
        return list(self._saved)

    def __len__(self) -> int:
        return len(self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (bitwise); a second call does nothing."""
        if self.restored:
            return
        missing = [n for n, s in self._saved.items() if not s.untied and s.original is None]
        if missing:
            raise RuntimeError(
                f"cannot restore {missing[:3]}...: apply_noise_ was called "
                "with keep_originals=False"
            )
        for saved in self._saved.values():
            if saved.untied:
                saved.module.weight = saved.param  # re-tie: the shared Parameter is untouched
            else:
                # Through the parameter under no_grad (not .data): the version counter moves,
                # so caches keyed on it (AnalogLinear's eval statistics) see the change.
                with torch.no_grad():
                    saved.param.copy_(saved.original)
        self.restored = True
        self._saved = {n: dataclasses.replace(s, original=None) for n, s in self._saved.items()}

    def __enter__(self) -> NoiseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (
            f"NoiseHandle({self.noise_model.label}, seed={self.seed}, "
            f"layers={len(self._saved)}, restored={self.restored})"
        )


@torch.no_grad()
def apply_noise_(
    model: nn.Module,
    noise_model: NoiseModel,
    seed: int,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_lm_head: bool = True,
    only_analog: bool = False,
    skip_adapters: bool = True,
    keep_originals: bool = True,
) -> NoiseHandle:
    """Perturb the weights of the selected layers in place (see ``select_noise_layers``).

    Layer ``name`` uses ``torch.Generator(device).manual_seed(layer_seed(seed, name))``.
    A weight shared with another module (e.g. an LM head tied to the embeddings) is
    untied first, so the noise never leaks into the other module.  Returns a handle
    whose ``restore()`` puts the exact original weights back.
    """
    if not isinstance(noise_model, NoiseModel):
        raise TypeError(f"noise_model must be a NoiseModel, got {type(noise_model).__name__}")
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    seed = operator.index(seed)  # accepts numpy ints; TypeError for anything else
    layers = select_noise_layers(
        model,
        include=include,
        exclude=exclude,
        skip_lm_head=skip_lm_head,
        only_analog=only_analog,
        skip_adapters=skip_adapters,
    )
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    saved: dict[str, _Saved] = {}
    for name, module in layers.items():
        param = module.weight
        gen = torch.Generator(device=param.device).manual_seed(layer_seed(seed, name))
        transposed = _is_conv1d(module)  # Conv1D stores [K, N_out]
        w = param.detach()
        noisy = noise_model.perturb_weight(w.t() if transposed else w, gen)
        noisy = noisy.t() if transposed else noisy
        if uses.get(id(param), 0) > 1:  # shared: give this module its own Parameter
            module.weight = nn.Parameter(noisy.contiguous(), requires_grad=param.requires_grad)
            saved[name] = _Saved(module, param, None, untied=True)
            logger.debug("apply_noise_: untied shared weight of %s", name)
        else:
            original = param.detach().to("cpu", copy=True) if keep_originals else None
            with torch.no_grad():  # not .data: keep the version counter moving
                param.copy_(noisy)
            saved[name] = _Saved(module, param, original, untied=False)
    if not layers:
        logger.warning("apply_noise_: no layer selected (include=%r, exclude=%r)", include, exclude)
    logger.info(
        "apply_noise_: perturbed %d layers with %s (seed=%d)", len(layers), noise_model.label, seed
    )
    return NoiseHandle(saved, noise_model, seed)


def apply_noise(model: nn.Module, noise_model: NoiseModel, seed: int, **kwargs: Any) -> nn.Module:
    """A deep copy of ``model`` with noise applied (same options as ``apply_noise_``)."""
    import copy

    noisy = copy.deepcopy(model)
    apply_noise_(noisy, noise_model, seed, keep_originals=False, **kwargs)
    return noisy
