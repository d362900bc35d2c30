"""``afm.convert`` / ``afm.revert``: swap a model's linear layers for analog ones in place.

Only leaf modules are swapped, so the model keeps its class, ``generate`` and
``save_pretrained``.  Layers are converted one at a time and reuse the original
parameters, so converting never doubles the model's memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import nn

from afm.analog.hf import AfmQuantizationConfig, is_afm_checkpoint_config
from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.select import (
    Selector,
    compile_patterns,
    input_embedding_weight,
    is_linear_like,
    name_matches,
    output_head_names,
    set_module,
    untie_word_embeddings,
)
from afm.config import AnalogConfig

logger = logging.getLogger(__name__)

__all__ = ["analog_layers", "convert", "revert"]


def convert(
    model: nn.Module,
    config: AnalogConfig | AfmQuantizationConfig,
    *,
    include: Selector = None,
    exclude: Selector = None,
    overrides: Mapping[str, AnalogConfig] | None = None,
    convert_lm_head: bool = False,
) -> nn.Module:
    """Swap ``nn.Linear`` (and GPT-2 ``Conv1D``) layers for ``AnalogLinear`` in place.

    Args:
        model: any torch module, typically a HF causal LM.
        config: the hardware model for every converted layer; or an afm
            ``AfmQuantizationConfig`` (a placement from ``afm-plan place``, or a
            checkpoint's ``quantization_config``, ``afm.analog.hf.read_quantization_config``):
            then exactly its ``modules`` become analog, each with its own config, and
            ``include`` / ``exclude`` / ``overrides`` / ``convert_lm_head`` must stay unset.
        include: names / regexes of layers to convert (default: all linear layers).
        exclude: names / regexes of layers to keep digital (applied after ``include``).
        overrides: ``{pattern: config}``; the first pattern that matches a layer's name
            gives that layer's config instead of ``config``.
        convert_lm_head: make the output head analog too (digital by default).  A head
            tied to the input embedding gets its own weight; the embedding never changes.

    Returns:
        ``model`` itself, converted.
    """
    if isinstance(config, AfmQuantizationConfig):
        if include is not None or exclude is not None or overrides or convert_lm_head:
            raise ValueError(
                "afm.convert with an afm quantization config (a placement) converts exactly "
                "its modules: do not pass include, exclude, overrides or convert_lm_head"
            )
        return _convert_listed(model, config)
    if not isinstance(config, AnalogConfig):
        raise TypeError(f"config must be an AnalogConfig, got {type(config).__name__}")
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    over = [(re.compile(k), v) for k, v in (overrides or {}).items()]
    heads = output_head_names(model)
    emb_weight = input_embedding_weight(model)
    targets = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AnalogLinear) or not is_linear_like(module):
            continue
        if name in heads and not convert_lm_head:
            continue
        if inc is not None and not name_matches(name, inc):
            continue
        if exc is not None and name_matches(name, exc):
            continue
        targets.append(name)
    untied = False
    for name in targets:
        module = model.get_submodule(name)
        layer_cfg = next((cfg for pat, cfg in over if name_matches(name, [pat])), config)
        layer = AnalogLinear.from_linear(module, layer_cfg)
        if emb_weight is not None and layer.weight is emb_weight:
            # An analog head must not share (and later clip) the embedding table.
            layer.weight = nn.Parameter(
                layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
            )
            untied = True
        set_module(model, name, layer)
    if untied:
        untie_word_embeddings(model)
    logger.info("afm.convert: %d layers converted to AnalogLinear", len(targets))
    return model


def _exact(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name) + "$")


def _convert_listed(model: nn.Module, qc: AfmQuantizationConfig) -> nn.Module:
    """``convert`` of exactly the layers an afm quantization config lists (all linear
    layers but the head when it lists none), each with its own config."""
    overrides = {_exact(n): cfg for n, cfg in qc.overrides.items()}
    if qc.modules is None:
        return convert(
            model, qc.analog_config, overrides=overrides, convert_lm_head=qc.convert_lm_head
        )
    stray = sorted(set(qc.overrides) - set(qc.modules))
    if stray:
        raise ValueError(f"the afm config has overrides for layers it does not list: {stray}")
    for name in qc.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the afm config lists layer {name!r}, which the model does not have"
            ) from None
        if not is_linear_like(module):
            raise ValueError(
                f"the afm config lists layer {name!r}, which is a {type(module).__name__}, "
                "not a linear layer"
            )
    listed = set(qc.modules)
    convert(
        model,
        qc.analog_config,
        include=[_exact(n) for n in qc.modules],
        overrides=overrides,
        convert_lm_head=bool(listed & output_head_names(model)),
    )
    missing = sorted(listed - set(analog_layers(model)))
    if missing:  # unreachable unless a rule above changes: never leave a layer out silently
        raise ValueError(f"afm.convert: layers {missing} of the afm config were not converted")
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
