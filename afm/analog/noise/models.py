"""Deployment noise models (spec ``hardware-model.md`` §5).

A noise model is a frozen dataclass with one pure method,
``perturb_weight(weight, generator) -> Tensor``:

* ``PCMProgrammingNoise`` ("pcm", §5a) — the AFM paper's evaluation model.
* ``GaussianWeightNoise`` ("gaussian") — additive ``std · max|W_row| · ξ``.
* ``PCMDriftNoise`` ("pcm-drift", §5b) — PCM-like programming noise, conductance
  drift, 1/f read noise at time ``t_inference`` and global drift compensation.

For the same generator state, ``PCMDriftNoise`` draws the programming noise and drift
exponents first, so the same seed at different ``t_inference`` is the same programmed
chip read at different times.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from afm.analog.noise.durations import parse_duration
from afm.reference import tile_bounds
from afm.validation import check_bool, check_real, fail

__all__ = [
    "NoiseModel",
    "PCMProgrammingNoise",
    "GaussianWeightNoise",
    "PCMDriftNoise",
    "PCMDeviceState",
    "NOISE_MODELS",
    "get_noise_model",
    "noise_model_from_dict",
    "pcm_sigma",
]

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


def _check_tile_size(owner: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(owner, "tile_size", value, "must be a positive int or None (one tile)")


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
        check_real(type(self).__name__, "scale", self.scale)
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
        check_real(owner, "std", self.std)
        check_real(owner, "scale", self.scale)
        _check_tile_size(owner, self.tile_size)
        check_bool(owner, "per_channel", self.per_channel)

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

    ``mode="aihwkit"`` follows aihwkit's ``PCMLikeNoiseModel`` with
    ``GlobalDriftCompensation`` (spec §5c): read noise at ``t + t0`` (non-zero at 0 s), the
    device pair re-derived from the programmed net weight before drifting, and one
    compensation factor per input tile read through the periphery: the identity probe's
    outputs with ``readout_noise`` (output noise, relative to the channel's range) and an
    ADC of ``readout_bits`` bits and bound ``readout_bound`` (None: an ideal read).
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
    mode: str = "afm"
    readout_bits: int | None = None
    readout_bound: float = 12.0
    readout_noise: float = 0.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.mode not in ("afm", "aihwkit"):
            fail(owner, "mode", self.mode, "must be 'afm' or 'aihwkit'")
        if self.readout_bits is not None and (
            isinstance(self.readout_bits, bool)
            or not isinstance(self.readout_bits, int)
            or not 2 <= self.readout_bits <= 24
        ):
            fail(owner, "readout_bits", self.readout_bits, "must be an int in [2, 24] or None")
        check_real(owner, "readout_bound", self.readout_bound, strict=True)
        check_real(owner, "readout_noise", self.readout_noise)
        if self.mode == "afm" and (self.readout_bits is not None or self.readout_noise > 0):
            fail(owner, "mode", self.mode, "a periphery read-out needs mode='aihwkit'")
        if self.mode == "aihwkit" and self.probe != "identity":
            fail(owner, "probe", self.probe, "mode='aihwkit' reads with the identity probe")
        if isinstance(self.t_inference, str):
            object.__setattr__(self, "t_inference", parse_duration(self.t_inference))
        check_real(owner, "t_inference", self.t_inference)
        object.__setattr__(self, "t_inference", float(self.t_inference))
        check_bool(owner, "compensation", self.compensation)
        for name in ("scale", "read_noise_scale", "drift_scale"):
            check_real(owner, name, getattr(self, name))
        for name in ("g_max", "t0", "t_read"):
            check_real(owner, name, getattr(self, name), strict=True)
        _check_tile_size(owner, self.tile_size)
        check_bool(owner, "per_channel", self.per_channel)
        if self.probe not in ("identity", "random"):
            fail(owner, "probe", self.probe, "must be 'identity' or 'random'")

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
        """Relative 1/f read-noise σ at time ``t`` (zero when ``(t+t_read)/(2 t_read) ≤ 1``).

        Mode ``aihwkit`` evaluates it at ``t + t0`` (pcm.py, ``apply_drift_noise_to_
        conductance``: ``t = t_inference + t_0``, then ``log((t + t_read) / (2 t_read))``)."""
        if self.mode == "aihwkit":
            t = t + self.t0
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
        pairs = (state.g_plus, state.g_minus)
        if self.mode == "aihwkit":
            pairs = self.rederive_pair(state)
        out = []
        for g_prog, nu in zip(pairs, (state.nu_plus, state.nu_minus), strict=True):
            g = g_prog * ((t + self.t0) / self.t0) ** (-nu) if t > 0 else g_prog.clone()
            sigma = self.read_noise_sigma(g_prog, t) * (self.scale * self.read_noise_scale)
            if (t > 0 or self.mode == "aihwkit") and bool((sigma > 0).any()):
                g = (g + g.abs() * sigma * _randn(g, generator)).clamp_min(0.0)
            out.append(g)
        if self.mode == "aihwkit":  # back to the programming's units (pair scale undone)
            ratio = self._rederived_scale(state)
            return out[0] / ratio, out[1] / ratio
        return out[0], out[1]

    def _rederived_scale(self, state: PCMDeviceState) -> Tensor:
        """``g_max / max|g+ - g-|`` over each tile: aihwkit converts the programmed net
        weight to a new pair with the converter's tile-wide scale (conductance.py,
        ``SinglePairConductanceConverter.convert_to_conductances``)."""
        net = state.g_plus - state.g_minus
        return self.g_max / _nonzero(_row_abs_max(net, self.tile_size, per_channel=False))

    def rederive_pair(self, state: PCMDeviceState) -> tuple[Tensor, Tensor]:
        """The pair aihwkit drifts (mode ``aihwkit``): ``drift_weights`` hands the
        programmed weights to ``apply_drift_noise`` (inference.py), which converts them to
        conductances again: one device at ``|net|·scale``, the other at 0."""
        scaled = (state.g_plus - state.g_minus) * self._rederived_scale(state)
        return scaled.clamp(0.0, self.g_max), (-scaled).clamp(0.0, self.g_max)

    def to_weight(self, g_plus: Tensor, g_minus: Tensor, amax: Tensor) -> Tensor:
        return (g_plus - g_minus) * (amax / self.g_max)

    def readout(self, weight: Tensor) -> Tensor:
        """``r = mean|probe · Wᵀ|`` for the drift compensation (a 0-d tensor)."""
        if self.probe == "identity":
            return weight.abs().mean()
        gen = torch.Generator(device=weight.device).manual_seed(_PROBE_SEED)
        x = torch.randn(_PROBE_SIZE, weight.shape[1], generator=gen, device=weight.device)
        return (x @ weight.t()).abs().mean()

    def periphery_readout(self, g_net: Tensor, generator: torch.Generator) -> Tensor:
        """Per input tile, ``mean|y|`` of the identity probe read through the periphery
        (mode ``aihwkit``, inference.py ``_forward_drift_readout_tensor``; readout clamped
        at 1e-4 as ``GlobalDriftCompensation.readout``), broadcastable to the weight.

        ``g_net = g+ - g-`` (µS): a one-hot input reads one weight per output, in units of
        the channel's (or tile's) range: ``g_net / g_max``, plus output noise, then the ADC.
        """
        y = g_net / self.g_max
        if self.readout_noise > 0:
            y = y + self.readout_noise * _randn(y, generator)
        if self.readout_bits is not None:
            step = 2 * self.readout_bound / (2**self.readout_bits - 2)
            y = (torch.round(y / step) * step).clamp(-self.readout_bound, self.readout_bound)
        bounds = tile_bounds(y.shape[1], self.tile_size)
        reads = [y[:, lo:hi].abs().mean().clamp_min(1e-4) for lo, hi in bounds]
        sizes = torch.tensor([hi - lo for lo, hi in bounds], device=y.device)
        return torch.stack(reads).repeat_interleave(sizes).unsqueeze(0)

    def _aihwkit_weight(self, state: PCMDeviceState, generator: torch.Generator) -> Tensor:
        g_plus, g_minus = self.conductances_at(state, self.t_inference, generator)
        w_t = self.to_weight(g_plus, g_minus, state.amax)
        if self.compensation:
            r0 = self.periphery_readout(state.g_plus - state.g_minus, generator)
            r_t = self.periphery_readout(g_plus - g_minus, generator)
            w_t = w_t * (r0 / r_t)
        return w_t

    def perturb_weight(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        state = self.program(weight, generator)
        if self.mode == "aihwkit":
            return self._aihwkit_weight(state, generator).to(weight.dtype)
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
