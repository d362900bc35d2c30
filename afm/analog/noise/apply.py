"""Programming a model onto a simulated chip: deployment noise applied in place, reversibly.

``apply_noise_(model, noise_model, seed)`` perturbs the weights of the selected linear
layers once (``select_noise_layers``) and returns a :class:`NoiseHandle` whose
``restore()`` puts the exact original weights back; ``apply_noise`` works on a copy.

Randomness: every layer gets its own ``torch.Generator`` seeded from
``layer_seed(seed, module_name)``, so a layer's noise does not depend on the order in
which layers are visited or on which other layers are selected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from afm.analog.experts import AnalogExperts, expert_matrix, expert_projections
from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.noise.models import NoiseModel
from afm.analog.select import (
    check_patterns_match,
    is_adapter_name,
    is_conv1d,
    is_experts,
    is_linear_like,
    name_matches,
    output_head_names,
)
from afm.seeds import derive_seed

__all__ = [
    "NoiseHandle",
    "apply_noise",
    "apply_noise_",
    "layer_seed",
    "seeded_noise",
    "seeded_read_noise",
    "select_noise_layers",
]

logger = logging.getLogger(__name__)


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for layer ``name``, stable across runs and Python versions."""
    return derive_seed("afm-noise", seed, name)


def select_noise_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_lm_head: bool | None = None,
    only_analog: bool = False,
    skip_adapters: bool = True,
) -> dict[str, nn.Module]:
    """The layers ``apply_noise_`` perturbs: every ``nn.Linear`` (and GPT-2 ``Conv1D``) and
    every MoE experts module (each expert's matrices on their own), except peft adapter
    layers (``lora_*``, digital in AHWA-LoRA) and, by default
    (``skip_lm_head=None``), a digital output head: an analog head (``AnalogLinear``,
    ``afm.convert(convert_lm_head=True)``) is on the chip and gets programmed like the
    other layers (spec §7).  ``skip_lm_head=True`` / ``False`` skips / perturbs any head.

    ``include``/``exclude``: module names or regular expressions searched in the name
    (``afm.analog.select.name_matches``); ``only_analog``: only analog modules
    (``AnalogLinear``, ``AnalogExperts``).  MoE routers are linear layers only where the
    family makes them ``nn.Linear``; the ``TopKRouter`` modules are digital (not perturbed).

    Raises:
        PatternMatchError: an include / exclude pattern matches none of the layers that
            can be selected (the message lists the closest names).
        ValueError: no layer is selected (noise on nothing would be a clean model).
    """
    inc, exc = _names(include), _names(exclude)
    heads = output_head_names(model) if skip_lm_head is not False else set()
    eligible: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_experts(module):
            if not only_analog or isinstance(module, AnalogExperts):
                eligible[name] = module
            continue
        if not is_linear_like(module):
            continue
        if only_analog and not isinstance(module, AnalogLinear):
            continue
        if name in heads and (skip_lm_head or not isinstance(module, AnalogLinear)):
            continue
        if skip_adapters and is_adapter_name(name):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            logger.warning("apply_noise_: skipping %s (weight is not a floating tensor)", name)
            continue
        eligible[name] = module
    what = "analog layer" if only_analog else "linear layer"
    check_patterns_match("deployment noise: include", inc, eligible, among=what)
    check_patterns_match("deployment noise: exclude", exc, eligible, among=what)
    selected = {
        name: module
        for name, module in eligible.items()
        if (inc is None or name_matches(name, inc)) and (exc is None or not name_matches(name, exc))
    }
    if not selected:
        raise ValueError(
            f"deployment noise: no layer selected among {len(eligible)} {what}s "
            f"(include={include!r}, exclude={exclude!r}); noise on nothing would report a "
            "clean model as a noisy one"
        )
    return selected


@dataclass
class _Saved:
    module: nn.Module
    param: nn.Parameter  # the original Parameter object
    original: Tensor | None  # CPU copy (None when untied: ``param`` itself is untouched)
    untied: bool
    attr: str = "weight"  # the parameter's name on ``module``


class NoiseHandle:
    """Returned by ``apply_noise_``; ``restore()`` puts the original weights back bitwise
    (and re-ties weights that were untied).  Also a context manager."""

    def __init__(
        self,
        saved: dict[str, _Saved],
        noise_model: NoiseModel,
        seed: int,
        generators: dict[nn.Module, torch.Generator | None] | None = None,
    ) -> None:
        self._saved = saved
        self.noise_model = noise_model
        self.seed = seed
        self.restored = False
        self._generators = generators or {}

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
            if saved.untied:  # re-tie: the shared Parameter is untouched
                setattr(saved.module, saved.attr, saved.param)
            else:
                # Through the parameter under no_grad (not .data): the version counter moves,
                # so caches keyed on it (AnalogLinear's eval statistics) see the change.
                with torch.no_grad():
                    saved.param.copy_(saved.original)
        for layer, generator in self._generators.items():
            layer.noise_generator = generator
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
    skip_lm_head: bool | None = None,
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
        if is_experts(module):
            saved.update(_perturb_experts(name, module, noise_model, seed, keep_originals))
            continue
        param = module.weight
        gen = torch.Generator(device=param.device).manual_seed(layer_seed(seed, name))
        transposed = is_conv1d(module)  # Conv1D stores [K, N_out]
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
    logger.info(
        "apply_noise_: perturbed %d layers with %s (seed=%d)", len(layers), noise_model.label, seed
    )
    return NoiseHandle(saved, noise_model, seed, _seed_read_noise(layers, seed))


def _perturb_experts(
    name: str, module: nn.Module, noise_model: NoiseModel, seed: int, keep_originals: bool
) -> dict[str, _Saved]:
    """Each expert's matrix of each projection perturbed on its own (its own crossbar),
    seeded by ``layer_seed(seed, "<name>.<proj>.<expert>")``; saved per fused tensor."""
    saved = {}
    for proj in expert_projections(module):
        param = getattr(module, proj)
        original = param.detach().to("cpu", copy=True) if keep_originals else None
        for e in range(param.shape[0]):
            w = expert_matrix(module, proj, e)
            gen = torch.Generator(device=param.device).manual_seed(
                layer_seed(seed, f"{name}.{proj}.{e}")
            )
            noisy = noise_model.perturb_weight(w.detach(), gen)
            with torch.no_grad():  # through the parameter: its version counter moves
                w.copy_(noisy)
        saved[f"{name}.{proj}"] = _Saved(module, param, original, untied=False, attr=proj)
    return saved


def _seed_read_noise(
    layers: dict[str, nn.Module], seed: int
) -> dict[nn.Module, torch.Generator | None]:
    """Seed the eval-time output noise of the programmed chip's analog layers (spec §4.1,
    ``output_noise.keep_at_eval``) from ``seed`` and the layer name, so that one seed is
    one chip read the same way every run; returns the generators to put back."""
    previous: dict[nn.Module, torch.Generator | None] = {}
    for name, module in layers.items():
        analog = isinstance(module, (AnalogLinear, AnalogExperts))
        if analog and module.analog_config.output_noise.keep_at_eval:
            previous[module] = module.noise_generator
            gen = torch.Generator().manual_seed(derive_seed("afm-read-noise", seed, name))
            module.noise_generator = gen
    return previous


@contextlib.contextmanager
def seeded_noise(model: nn.Module, seed: int, purpose: str) -> Iterator[nn.Module]:
    """Each analog layer (``analog_layers``: ``AnalogLinear`` and ``AnalogExperts``)
    draws its noise from its own generator seeded by ``(purpose, seed, layer name)``;
    the previous generators are put back on exit."""
    layers = analog_layers(model)
    saved = {m: m.noise_generator for m in layers.values()}
    for name, module in layers.items():
        module.noise_generator = torch.Generator().manual_seed(derive_seed(purpose, seed, name))
    try:
        yield model
    finally:
        for module, generator in saved.items():
            module.noise_generator = generator


@contextlib.contextmanager
def seeded_read_noise(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """The model's eval-time output noise seeded from ``seed`` and each layer's name, as
    on a programmed chip, without programming noise: an unprogrammed evaluation of a
    chip whose output noise stays on at eval (``ahwa-lora``) is reproducible too.  The
    layers' previous generators are put back on exit."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AnalogLinear)}
    previous = _seed_read_noise(layers, seed)
    try:
        yield model
    finally:
        for layer, generator in previous.items():
            layer.noise_generator = generator


def apply_noise(model: nn.Module, noise_model: NoiseModel, seed: int, **kwargs: Any) -> nn.Module:
    """A deep copy of ``model`` with noise applied (same options as ``apply_noise_``)."""
    import copy

    noisy = copy.deepcopy(model)
    apply_noise_(noisy, noise_model, seed, keep_originals=False, **kwargs)
    return noisy
