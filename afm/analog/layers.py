"""``AnalogLinear``: an ``nn.Linear`` that simulates an analog crossbar (spec §1-4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from afm import reference
from afm.analog.select import is_conv1d
from afm.config import AnalogConfig, Backend
from afm.kernels import dispatch
from afm.presets import get_preset

_SEED_HIGH = 2**62


class AnalogLinear(nn.Linear):
    """A drop-in ``nn.Linear`` whose matmul runs through the analog hardware model.

    Parameters keep their standard names (``weight``, ``bias``) plus
    ``input_range`` (fp32, one entry per tile).  In training mode weight and output
    noise are resampled every forward (seeds drawn from torch's default generator,
    or from ``noise_generator`` when set); input and output quantization apply in
    both modes.  The stored weight is never modified by a forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: AnalogConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.analog_config = config if config is not None else get_preset("afm-paper")
        self.input_range = nn.Parameter(
            torch.full(
                (self.analog_config.num_tiles(in_features),),
                self.analog_config.input.init_value,
                dtype=torch.float32,
                device=device,
            ),
            requires_grad=self.analog_config.input.uses_range,
        )
        self.noise_generator: torch.Generator | None = None
        self.source_type = "linear"  # "conv1d" when converted from transformers' GPT-2 Conv1D
        self._backends: dict[str, Backend] = {}
        self._abs_max_cache: tuple[tuple, Tensor] | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, config: AnalogConfig) -> AnalogLinear:
        """Wrap ``linear`` (``nn.Linear`` or GPT-2 ``Conv1D``), reusing its parameters.

        No weight is copied for ``nn.Linear`` (tied parameters stay tied and memory does
        not grow); a ``Conv1D`` weight is transposed once.
        """
        if isinstance(linear, nn.Linear):
            in_f, out_f, weight, source = (
                linear.in_features,
                linear.out_features,
                linear.weight,
                "linear",
            )
        elif is_conv1d(linear):
            out_f, in_f = linear.nf, linear.weight.shape[0]
            weight = nn.Parameter(
                linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad
            )
            source = "conv1d"
        else:
            raise TypeError(f"cannot convert {type(linear).__name__} to AnalogLinear")
        layer = cls(
            in_f,
            out_f,
            bias=linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
            config=config,
        )
        layer.weight = weight
        layer.bias = linear.bias
        layer.input_range = nn.Parameter(
            torch.full_like(layer.input_range, config.input.init_value, device=weight.device),
            requires_grad=config.input.uses_range,
        )
        layer.source_type = source
        layer._abs_max_cache = None
        layer.train(linear.training)
        return layer

    def to_linear(self) -> nn.Module:
        """The digital layer back, sharing this layer's parameters (bitwise identical)."""
        if self.source_type == "conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(self.out_features, self.in_features)
            conv.weight = nn.Parameter(
                self.weight.detach().t().contiguous(), requires_grad=self.weight.requires_grad
            )
            conv.bias = self.bias
            conv.train(self.training)
            return conv
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    # -- properties ----------------------------------------------------------------------
    @property
    def tile_bounds(self) -> list[tuple[int, int]]:
        return reference.tile_bounds(self.in_features, self.analog_config.max_input_size)

    def set_config(self, config: AnalogConfig) -> None:
        """Change the hardware model (the tile count must stay the same)."""
        if config.num_tiles(self.in_features) != self.input_range.numel():
            raise ValueError(
                f"config with max_input_size={config.max_input_size} needs "
                f"{config.num_tiles(self.in_features)} tiles, layer has {self.input_range.numel()}"
            )
        self.analog_config = config
        self.input_range.requires_grad_(config.input.uses_range)
        self._backends.clear()
        self._abs_max_cache = None

    def backend_for(self, device: torch.device) -> Backend:
        backend = self._backends.get(device.type)
        if backend is None:
            backend = dispatch.resolve_backend(
                self.analog_config.backend, device, self.analog_config
            )
            self._backends[device.type] = backend
        return backend

    def _next_seed(self) -> int:
        return int(torch.randint(0, _SEED_HIGH, (1,), generator=self.noise_generator).item())

    # -- forward -------------------------------------------------------------------------
    def _eval_abs_max(self) -> Tensor | None:
        """``weight_abs_max`` cached across eval forwards (the weight does not change).

        The cache is keyed on the weight's storage and autograd version counter, which
        every in-place update through the parameter bumps (optimizer steps, ``copy_``
        under ``no_grad``, afm's clipping and noise).  Edits through ``weight.data``
        bypass the counter: call ``invalidate_cache()`` after those.
        """
        cfg = self.analog_config
        if self.training or cfg.output.bits is None or cfg.weight_quant.bits is not None:
            return None
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, cfg.max_input_size)
        if self._abs_max_cache is not None and self._abs_max_cache[0] == key:
            return self._abs_max_cache[1]
        a = reference.weight_abs_max(w, self.tile_bounds)
        self._abs_max_cache = (key, a)
        return a

    def invalidate_cache(self) -> None:
        self._abs_max_cache = None

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.analog_config
        seed = self._next_seed() if any(reference.noise_in_mode(cfg, self.training)) else None
        return dispatch.analog_linear(
            x,
            self.weight,
            self.bias,
            self.input_range,
            cfg,
            training=self.training,
            seed=seed,
            backend=self.backend_for(x.device),
            abs_max=self._eval_abs_max(),
        )

    @torch.no_grad()
    def clip_weights_(self) -> None:
        """Spec §3 clipping of the stored weight, in place."""
        clip = self.analog_config.clip
        # Through the parameter (not .data) so its version counter moves.
        reference.clip_weight_(self.weight, clip.kind, clip.sigma)

    def extra_repr(self) -> str:
        cfg = self.analog_config
        return (
            f"{super().extra_repr()}, tiles={self.input_range.numel()}, "
            f"in_bits={cfg.input.bits}, out_bits={cfg.output.bits}, "
            f"weight_noise={cfg.weight_noise.kind.value}:{cfg.weight_noise.std}"
        )


def analog_layers(model: nn.Module) -> dict[str, AnalogLinear]:
    """``{qualified name: layer}`` for every ``AnalogLinear`` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLinear)}
