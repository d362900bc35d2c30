"""``AnalogExperts``: transformers' fused MoE experts on the analog chip (spec §1-4, §8).

transformers 5 stores a MoE layer's experts as fused 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]; GPT-OSS transposed, interleaved and with biases) in
a class decorated with ``use_experts_implementation``, which records the layout
(``has_gate``, ``has_bias``, ``is_transposed``) and gives the class its gate
(``_apply_gate``).  ``AnalogExperts`` takes that module's place and its parameters (the
same ``Parameter`` objects under the same names: no copy, no memory growth, checkpoints
keep their keys) and runs every expert's projections through the dense analog op of
``AnalogLinear`` (``afm.kernels.dispatch.analog_linear``: the same spec and backends):

* each expert is its own crossbar: its input ranges (``<proj>_input_range`` [E, tiles],
  learned and calibrated on the tokens routed to that expert only), its weight noise and
  clipping, its ADC bounds per output channel;
* grouped: the token-expert pairs are sorted by expert once (as transformers'
  ``grouped_mm`` does), and each expert that received tokens runs one analog matmul on
  its contiguous block; experts without tokens cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from afm import reference
from afm.analog.select import is_experts
from afm.config import AnalogConfig, Backend
from afm.kernels import dispatch

__all__ = ["AnalogExperts", "RangeObserver", "expert_matrix", "expert_projections"]

_SEED_HIGH = 2**62

#: ``observer(module, projection, expert, x)``: sees each expert's routed inputs before its
#: analog matmul (``afm.analog.calibration`` sets one to initialise the ranges per expert).
RangeObserver = Callable[["AnalogExperts", str, int, Tensor], None]


def expert_projections(experts: nn.Module) -> tuple[str, str]:
    """The fused weights of an experts module (digital or analog), input side first."""
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


def expert_matrix(experts: nn.Module, proj: str, expert: int) -> Tensor:
    """Expert ``expert``'s ``[out, in]`` matrix of ``proj``: a view of the fused tensor."""
    w = getattr(experts, proj)[expert]
    return w.t() if experts.is_transposed else w


class AnalogExperts(nn.Module):
    """The analog replacement of a transformers experts module (see the module doc).

    Built with :meth:`from_experts`; :meth:`to_experts` gives the digital module back with
    the same (bitwise identical) parameters.  ``forward(hidden_states, top_k_index,
    top_k_weights)`` has the signature of the module it replaces.
    """

    def __init__(self, experts: nn.Module, config: AnalogConfig) -> None:
        super().__init__()
        if not is_experts(experts):
            raise TypeError(
                f"{type(experts).__name__} is not a transformers experts module "
                "(a class decorated with use_experts_implementation)"
            )
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError("AnalogExperts: expert-parallel experts modules are not supported")
        # The digital module is kept (unregistered) for its gate and activation; its
        # parameters are the ones registered here.
        object.__setattr__(self, "_digital", experts)
        self.num_experts = int(experts.num_experts)
        self.has_gate = bool(experts.has_gate)
        self.has_bias = bool(experts.has_bias)
        self.is_transposed = bool(experts.is_transposed)
        self.has_post_expert_norm = bool(getattr(experts, "has_post_expert_norm", False))
        self.projections = expert_projections(experts)
        for name, param in experts.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in experts.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        for name, child in experts.named_children():
            self.add_module(name, child)
        self.analog_config = config
        for proj in self.projections:
            weight = getattr(self, proj)
            rng = torch.full(
                (self.num_experts, config.num_tiles(self.in_features(proj))),
                config.input.init_value,
                dtype=torch.float32,
                device=weight.device,
            )
            self.register_parameter(
                f"{proj}_input_range", nn.Parameter(rng, requires_grad=config.input.uses_range)
            )
        self.noise_generator: torch.Generator | None = None
        self.range_observer: RangeObserver | None = None
        self._backends: dict[str, Backend] = {}
        self._abs_max_cache: dict[str, tuple[tuple, Tensor]] = {}
        self.train(experts.training)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: nn.Module, config: AnalogConfig) -> AnalogExperts:
        """Wrap ``experts`` (a transformers experts module), reusing its parameters."""
        return cls(experts, config)

    def to_experts(self) -> nn.Module:
        """The digital experts module back, holding this module's current parameters."""
        digital = self._digital
        for name, param in self.named_parameters(recurse=False):
            if not name.endswith("_input_range"):
                setattr(digital, name, param)
        digital.train(self.training)
        return digital

    # -- shapes and tensors --------------------------------------------------------------
    def in_features(self, proj: str) -> int:
        w = getattr(self, proj)
        return int(w.shape[1] if self.is_transposed else w.shape[2])

    def out_features(self, proj: str) -> int:
        w = getattr(self, proj)
        return int(w.shape[2] if self.is_transposed else w.shape[1])

    def tile_bounds(self, proj: str) -> list[tuple[int, int]]:
        return reference.tile_bounds(self.in_features(proj), self.analog_config.max_input_size)

    def expert_weight(self, proj: str, expert: int) -> Tensor:
        """Expert ``expert``'s ``[out, in]`` matrix of ``proj``: a view of the fused tensor."""
        return expert_matrix(self, proj, expert)

    def expert_bias(self, proj: str, expert: int) -> Tensor | None:
        return getattr(self, f"{proj}_bias")[expert] if self.has_bias else None

    def input_range(self, proj: str) -> nn.Parameter:
        return getattr(self, f"{proj}_input_range")

    def input_ranges(self) -> dict[str, nn.Parameter]:
        """``{parameter name: input ranges [E, tiles]}`` of both projections."""
        return {f"{p}_input_range": self.input_range(p) for p in self.projections}

    def matrices(self) -> Iterator[tuple[str, int, Tensor]]:
        """``(projection, expert, [out, in] view)`` for every crossbar of the module."""
        for proj in self.projections:
            for e in range(self.num_experts):
                yield proj, e, self.expert_weight(proj, e)

    def analog_tensors(self) -> dict[str, Tensor | None]:
        """The tensors a checkpoint must hold finite (weights, biases, input ranges)."""
        out: dict[str, Tensor | None] = {}
        for proj in self.projections:
            out[proj] = getattr(self, proj)
            out[f"{proj}_bias"] = getattr(self, f"{proj}_bias", None) if self.has_bias else None
            out[f"{proj}_input_range"] = self.input_range(proj)
        return out

    # -- the chip ------------------------------------------------------------------------
    def set_config(self, config: AnalogConfig) -> None:
        """Change the hardware model (every projection's tile count must stay the same)."""
        for proj in self.projections:
            tiles = config.num_tiles(self.in_features(proj))
            if tiles != self.input_range(proj).shape[1]:
                raise ValueError(
                    f"config with max_input_size={config.max_input_size} needs {tiles} tiles "
                    f"for {proj}, the experts have {self.input_range(proj).shape[1]}"
                )
        self.analog_config = config
        for rng in self.input_ranges().values():
            rng.requires_grad_(config.input.uses_range)
        self._backends.clear()
        self._abs_max_cache.clear()

    def invalidate_cache(self) -> None:
        self._abs_max_cache.clear()

    @torch.no_grad()
    def clip_weights_(self) -> None:
        """Spec §3 clipping of every expert's matrices, each on its own (per crossbar)."""
        clip = self.analog_config.clip
        for _, _, w in self.matrices():
            reference.clip_weight_(w, clip.kind, clip.sigma)

    def backend_for(self, device: torch.device) -> Backend:
        return dispatch.cached_backend(self._backends, self.analog_config, device)

    def _eval_abs_max(self, proj: str) -> Tensor | None:
        """``weight_abs_max`` of every expert [E, S, N], cached across eval forwards (keyed
        on the fused weight's storage and version counter, as ``AnalogLinear`` does)."""
        cfg = self.analog_config
        if self.training or cfg.output.bits is None or cfg.weight_quant.bits is not None:
            return None
        w = getattr(self, proj)
        key = (w.data_ptr(), w._version, w.dtype, w.device, cfg.max_input_size)
        cached = self._abs_max_cache.get(proj)
        if cached is not None and cached[0] == key:
            return cached[1]
        bounds = self.tile_bounds(proj)
        a = torch.stack(
            [reference.weight_abs_max(self.expert_weight(proj, e), bounds) for e in range(len(w))]
        )
        self._abs_max_cache[proj] = (key, a)
        return a

    # -- forward -------------------------------------------------------------------------
    def _project(self, proj: str, x: Tensor, counts: list[int]) -> Tensor:
        """``proj`` of every expert on its block of ``x`` (rows sorted by expert)."""
        cfg = self.analog_config
        noisy = any(reference.noise_in_mode(cfg, self.training))
        seeds = (
            torch.randint(0, _SEED_HIGH, (self.num_experts,), generator=self.noise_generator)
            if noisy
            else None
        )
        abs_max = self._eval_abs_max(proj)
        backend = self.backend_for(x.device)
        ranges = self.input_range(proj)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            block = x[start : start + n]
            start += n
            if self.range_observer is not None:
                self.range_observer(self, proj, e, block)
            outs.append(
                dispatch.analog_linear(
                    block,
                    self.expert_weight(proj, e),
                    self.expert_bias(proj, e),
                    ranges[e],
                    cfg,
                    training=self.training,
                    seed=None if seeds is None else int(seeds[e]),
                    backend=backend,
                    abs_max=None if abs_max is None else abs_max[e],
                )
            )
        if not outs:
            return x.new_zeros(0, self.out_features(proj))
        return torch.cat(outs)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        num_top_k = top_k_index.size(-1)
        num_tokens, hidden = hidden_states.shape
        expert_ids = top_k_index.reshape(-1)
        sorted_ids, perm = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=self.num_experts).tolist()  # one sync
        x = hidden_states[perm // num_top_k]
        h = self._project(self.projections[0], x, counts)
        h = self._digital._apply_gate(h) if self.has_gate else self._digital.act_fn(h)
        y = self._project("down_proj", h, counts)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(y.dtype)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out = y[inverse].view(num_tokens, num_top_k, hidden).sum(dim=1)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        cfg = self.analog_config
        shapes = ", ".join(
            f"{p}={self.num_experts}x[{self.out_features(p)}, {self.in_features(p)}]"
            for p in self.projections
        )
        return (
            f"{shapes}, bias={self.has_bias}, in_bits={cfg.input.bits}, "
            f"out_bits={cfg.output.bits}, weight_noise={cfg.weight_noise.kind.value}:"
            f"{cfg.weight_noise.std}"
        )
