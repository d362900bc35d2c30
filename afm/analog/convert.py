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

from afm.analog.hf import is_afm_checkpoint_config
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
    config: AnalogConfig,
    *,
    include: Selector = None,
    exclude: Selector = None,
    overrides: Mapping[str, AnalogConfig] | None = None,
    convert_lm_head: bool = False,
) -> nn.Module:
    """Swap ``nn.Linear`` (and GPT-2 ``Conv1D``) layers for ``AnalogLinear`` in place.

    Args:
        model: any torch module, typically a HF causal LM.
        config: the hardware model for every converted layer.
        include: names / regexes of layers to convert (default: all linear layers).
        exclude: names / regexes of layers to keep digital (applied after ``include``).
        overrides: ``{pattern: config}``; the first pattern that matches a layer's name
            gives that layer's config instead of ``config``.
        convert_lm_head: make the output head analog too (digital by default).  A head
            tied to the input embedding gets its own weight; the embedding never changes.

    Returns:
        ``model`` itself, converted.
    """
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
