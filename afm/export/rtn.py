"""The digital baselines the AFM paper compares against.

* **RTN-W4** (an eval condition): :func:`rtn_w4` rounds the weights of every linear
  layer to 4-bit symmetric round-to-nearest, per output channel or per group,
  with :func:`afm.reference.fake_quantize_weight` (the same math the analog layer's
  ``weight_quant`` and :func:`afm.export.int4.export_int4` use).  Weights only; the
  activations stay in the model dtype.
* **W4A8 QAT** (a training condition): :func:`w4a8_qat_config` is the
  ``AnalogConfig`` that makes ``AnalogLinear`` a digital W4A8 layer: 4-bit weights
  with a straight-through gradient, 8-bit static inputs with learned per-layer
  ranges, no noise, no output quantization, no weight clipping.  Train it like any
  other afm config (``afm.convert(model, w4a8_qat_config())``, calibrate, distill).

Both reuse the analog layer's quantizers; nothing here re-implements their math.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from afm.analog.select import (
    check_patterns_match,
    is_adapter_name,
    name_matches,
    untie_word_embeddings,
)
from afm.config import AnalogConfig
from afm.presets import get_preset
from afm.reference import fake_quantize_weight
from afm.validation import check_int

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SKIP",
    "W4_BITS",
    "check_group_size",
    "rtn_w4",
    "select_w4_layers",
    "w4a8_qat_config",
]

W4_BITS = 4
DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)


def select_w4_layers(
    model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
) -> tuple[dict[str, nn.Linear], list[str]]:
    """``({name: layer} to quantize, [names of linear layers skipped])``.

    Every ``nn.Linear`` (``AnalogLinear`` included) whose name does not match ``skip``
    (``afm.analog.select.name_matches``: exact name, dotted suffix such as ``"lm_head"``
    or ``"down_proj"``, or a regular expression); peft adapter matrices (``lora_A`` /
    ``lora_B``) are never quantized.

    Raises:
        PatternMatchError: a ``skip`` pattern matches no linear layer (a typo would
            otherwise quantize the layer it meant, e.g. the output head).
        ValueError: every linear layer is skipped (nothing would be quantized).
    """
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    linear = {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and not is_adapter_name(name)
    }
    check_patterns_match("RTN-W4: skip", skip, linear, among="linear layer")
    targets: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    for name, module in linear.items():
        if name_matches(name, skip):
            skipped.append(name)
        else:
            targets[name] = module
    if not targets:
        raise ValueError(
            f"RTN-W4: no linear layer to quantize: skip={skip!r} matches all {len(linear)}"
        )
    return targets, skipped


def check_group_size(group_size: int | None) -> None:
    """A positive int or None (per output channel)."""
    check_int("rtn", "group_size", group_size, minimum=1, allow_none=True)


def check_group_divides(targets: dict[str, nn.Linear], group_size: int | None) -> None:
    """``group_size`` divides the input dimension of every target (nothing is changed
    before this holds)."""
    if group_size is None:
        return
    for name, layer in targets.items():
        if layer.in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={layer.in_features} "
                f"of layer {name!r}; use a divisor of it or group_size=None (per channel)"
            )


@torch.no_grad()
def rtn_w4(
    model: nn.Module,
    group_size: int | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> nn.Module:
    """RTN-W4 in place: every selected linear weight becomes its 4-bit fake-quantized value.

    ``Δ = max|W| / 7`` per output channel (``group_size=None``) or per group of
    ``group_size`` consecutive inputs, ``W ← clamp(round(W/Δ), ±7)·Δ`` (spec §3, via
    :func:`afm.reference.fake_quantize_weight`).  Works on plain and analog models
    (an ``AnalogLinear``'s stored digital weight is quantized; its analog path is
    untouched).  Layers matching ``skip`` (default: the output head) and peft adapter
    matrices keep their weights.  A quantized layer whose weight is shared with a layer
    that is not quantized (an output head tied to the embedding, with ``skip=()``)
    gets its own weight and the tie is dropped from ``model.config``.

    The change is **in place and not reversible**: pass ``copy.deepcopy(model)`` (or
    reload) to keep the original.  Returns ``model``.

    Raises:
        ValueError: an invalid group size, or one that does not divide a selected
            layer's input dimension (nothing is modified then).
    """
    check_group_size(group_size)
    targets, _ = select_w4_layers(model, skip)
    check_group_divides(targets, group_size)
    target_ids = {id(layer) for layer in targets.values()}
    # Parameters also used by a module that is not quantized (tied embeddings).
    shared_with_other = set()
    for module in model.modules():
        if id(module) in target_ids:
            continue
        for p in module.parameters(recurse=False):
            shared_with_other.add(id(p))
    done: set[int] = set()
    untied = False
    for layer in targets.values():
        w = layer.weight
        if id(w) in done:
            continue
        q = fake_quantize_weight(w.detach(), W4_BITS, group_size)
        if id(w) in shared_with_other:
            layer.weight = nn.Parameter(q.clone(), requires_grad=w.requires_grad)
            untied = True
        else:
            w.copy_(q)
            done.add(id(w))
    if untied:
        untie_word_embeddings(model)
    logger.info(
        "rtn_w4: %d linear layers quantized to 4 bits (%s)",
        len(targets),
        "per channel" if group_size is None else f"group {group_size}",
    )
    return model


def w4a8_qat_config(group_size: int | None = None) -> AnalogConfig:
    """The W4A8 QAT baseline as an ``AnalogConfig`` (digital, no analog effects).

    * weights: 4-bit symmetric RTN per output channel (or per ``group_size`` group),
      straight-through gradient to the fp master weights;
    * inputs: 8-bit static quantization with a learned range per layer
      (``learn_ranges=True``, initialised from data by ``afm.calibrate_input_ranges_``,
      learned with the spec §2.3 gradient);
    * no weight or output noise, no output (ADC) quantization, no weight clipping,
      one tile.
    """
    from dataclasses import replace

    config = get_preset("w4a8-qat")
    return replace(config, weight_quant=replace(config.weight_quant, group_size=group_size))
