"""``afm.convert`` / ``afm.set_chip`` / ``afm.revert``: put a model's linear layers on a chip.

Only leaf modules are swapped, so the model keeps its class, ``generate`` and
``save_pretrained``.  Layers are converted one at a time and reuse the original
parameters, so converting never doubles the model's memory.  A HF model also gets a
live afm quantization config (``afm.analog.hf``): ``save_pretrained`` writes the chip.

None of them is ever a silent no-op: a pattern that selects no layer, a selection that
converts nothing, or converting a model that already has analog layers is an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import nn

from afm.analog.hf import attach_quantization_config, is_afm_checkpoint_config
from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.select import (
    Selector,
    check_patterns_match,
    compile_patterns,
    input_embedding_weight,
    is_linear_like,
    name_matches,
    output_head_names,
    set_module,
    unmatched_error,
    untie_word_embeddings,
)
from afm.config import AnalogConfig

logger = logging.getLogger(__name__)

__all__ = ["AlreadyAnalogError", "analog_layers", "convert", "revert", "set_chip"]


class AlreadyAnalogError(ValueError):
    """``afm.convert`` on a model that already has analog layers."""


def _check_config(config: object, what: str) -> None:
    if not isinstance(config, AnalogConfig):
        raise TypeError(f"{what} must be an AnalogConfig, got {type(config).__name__}")


def _select(
    names: list[str], include: Selector, exclude: Selector, what: str, among: str
) -> list[str]:
    """``names`` filtered by include / exclude; each pattern must match one of ``names``."""
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    check_patterns_match(f"{what}: include", inc, names, among=among)
    check_patterns_match(f"{what}: exclude", exc, names, among=among)
    return [
        n
        for n in names
        if (inc is None or name_matches(n, inc)) and (exc is None or not name_matches(n, exc))
    ]


def _layer_configs(
    targets: list[str],
    config: AnalogConfig,
    overrides: Mapping[str, AnalogConfig] | None,
    what: str,
) -> dict[str, AnalogConfig]:
    """``{target: config}``: the first override pattern that matches a name wins; every
    pattern must give at least one target its config."""
    over = [(re.compile(k), v) for k, v in (overrides or {}).items()]
    for _, cfg in over:
        _check_config(cfg, f"{what}: an overrides value")
    used: set[int] = set()
    configs = {}
    for name in targets:
        hit = next((i for i, (pat, _) in enumerate(over) if name_matches(name, [pat])), None)
        configs[name] = config if hit is None else over[hit][1]
        if hit is not None:
            used.add(hit)
    unused = [pat for i, (pat, _) in enumerate(over) if i not in used]
    never = [pat for pat in unused if not any(name_matches(n, [pat]) for n in targets)]
    if never:
        raise unmatched_error(f"{what}: overrides", never, targets, among="selected layer")
    if unused:
        raise ValueError(
            f"{what}: overrides {', '.join(repr(p.pattern) for p in unused)} only match "
            "layers that an earlier pattern already configures (the first match wins)"
        )
    return configs


def _refuse_foreign_quantization(model: nn.Module) -> None:
    hf_config = getattr(model, "config", None)
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not is_afm_checkpoint_config(hf_config):
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ValueError(
            f"afm.convert: the model is already quantized with "
            f"{getattr(method, 'value', method)!r}; convert the original (unquantized) model"
        )


def _has_hf_config(model: nn.Module) -> bool:
    from transformers import PretrainedConfig

    return isinstance(getattr(model, "config", None), PretrainedConfig)


def convert(
    model: nn.Module,
    config: AnalogConfig,
    *,
    include: Selector = None,
    exclude: Selector = None,
    overrides: Mapping[str, AnalogConfig] | None = None,
    convert_lm_head: bool = False,
) -> nn.Module:
    """Swap ``nn.Linear`` (and GPT-2 ``Conv1D``) layers for ``AnalogLinear`` in place.

    Args:
        model: any torch module, typically a HF causal LM, without analog layers (to
            change the chip of an analog model use :func:`set_chip`).
        config: the hardware model for every converted layer.
        include: names / regexes of layers to convert (default: all linear layers).
        exclude: names / regexes of layers to keep digital (applied after ``include``).
        overrides: ``{pattern: config}``; the first pattern that matches a layer's name
            gives that layer's config instead of ``config``.
        convert_lm_head: make the output head analog too (digital by default).  A head
            tied to the input embedding gets its own weight; the embedding never changes.

    Returns:
        ``model`` itself, converted; a HF model's ``config`` carries a live afm
        quantization config, so ``model.save_pretrained`` writes the chip.

    Raises:
        AlreadyAnalogError: the model already has ``AnalogLinear`` layers.
        PatternMatchError: an include / exclude / overrides pattern selects no layer
            (the message lists the closest layer names).
        ValueError: nothing would be converted, or the model is quantized by another
            method.
    """
    _check_config(config, "config")
    existing = analog_layers(model)
    if existing:
        raise AlreadyAnalogError(
            f"afm.convert: the model already has {len(existing)} analog layers (e.g. "
            f"{next(iter(existing))!r}); converting again would leave them on their old "
            "chip. To put them on a new chip call afm.set_chip(model, config, include=..., "
            "overrides=...); to start over from the digital model call afm.revert(model) first"
        )
    _refuse_foreign_quantization(model)
    heads = output_head_names(model)
    linear = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    selected = _select(linear, include, exclude, "afm.convert", "linear layer")
    targets = [n for n in selected if convert_lm_head or n not in heads]
    if not targets:
        head_note = (
            " (the output head stays digital unless convert_lm_head=True)"
            if selected and not convert_lm_head
            else ""
        )
        raise ValueError(
            f"afm.convert: no layer to convert among the model's {len(linear)} linear "
            f"layers (include={include!r}, exclude={exclude!r}){head_note}"
        )
    layer_configs = _layer_configs(targets, config, overrides, "afm.convert")
    emb_weight = input_embedding_weight(model)
    untied = False
    for name in targets:
        layer = AnalogLinear.from_linear(model.get_submodule(name), layer_configs[name])
        if emb_weight is not None and layer.weight is emb_weight:
            # An analog head must not share (and later clip) the embedding table.
            layer.weight = nn.Parameter(
                layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
            )
            untied = True
        set_module(model, name, layer)
    if untied:
        untie_word_embeddings(model)
    if _has_hf_config(model):
        attach_quantization_config(model)
    logger.info("afm.convert: %d layers converted to AnalogLinear", len(targets))
    return model


def set_chip(
    model: nn.Module,
    config: AnalogConfig,
    *,
    include: Selector = None,
    exclude: Selector = None,
    overrides: Mapping[str, AnalogConfig] | None = None,
) -> nn.Module:
    """Put the model's existing analog layers on a new chip, in place.

    Weights and learned input ranges are kept; only each layer's hardware model
    changes (``AnalogLinear.set_config``).  ``include`` / ``exclude`` / ``overrides``
    select among the analog layers as in :func:`convert`.  A config that changes a
    layer's tile count (``max_input_size``) is refused before any layer changes: the
    ranges are per tile, so convert the digital model again instead.  What
    ``save_pretrained`` writes follows the new chip.

    Returns:
        ``model`` itself.
    """
    _check_config(config, "config")
    layers = analog_layers(model)
    if not layers:
        raise ValueError("afm.set_chip: the model has no AnalogLinear layers; use afm.convert")
    targets = _select(list(layers), include, exclude, "afm.set_chip", "analog layer")
    if not targets:
        raise ValueError(
            f"afm.set_chip: include={include!r} / exclude={exclude!r} leave no analog layer"
        )
    layer_configs = _layer_configs(targets, config, overrides, "afm.set_chip")
    for name in targets:
        layer, cfg = layers[name], layer_configs[name]
        tiles = cfg.num_tiles(layer.in_features)
        if tiles != layer.input_range.numel():
            raise ValueError(
                f"afm.set_chip: the new config (max_input_size={cfg.max_input_size}) gives "
                f"layer {name!r} {tiles} tiles, it has {layer.input_range.numel()}; input "
                "ranges are per tile, so nothing was changed: afm.revert the model and "
                "afm.convert it with the new config (then calibrate)"
            )
    uncalibrated = [
        n
        for n in targets
        if layer_configs[n].input.uses_range and not layers[n].analog_config.input.uses_range
    ]
    if uncalibrated:
        logger.warning(
            "afm.set_chip: %d layers (e.g. %s) had no learned input ranges; theirs stay at "
            "the old init value until you calibrate (afm.calibrate_input_ranges_)",
            len(uncalibrated),
            uncalibrated[0],
        )
    for name in targets:
        layers[name].set_config(layer_configs[name])
    logger.info("afm.set_chip: %d analog layers on the new chip", len(targets))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Put digital layers back (bitwise-identical weights); ``input_range`` is dropped."""
    names = list(analog_layers(model))
    for name in names:
        set_module(model, name, model.get_submodule(name).to_linear())
    hf_config = getattr(model, "config", None)
    if is_afm_checkpoint_config(hf_config):
        del hf_config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    logger.info("afm.revert: %d layers reverted", len(names))
    return model
