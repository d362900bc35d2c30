"""``afm.convert`` / ``afm.revert``: swap a model's linear layers for analog ones in place.

Only leaf modules are swapped, so the model keeps its class, ``generate`` and
``save_pretrained``.  Layers are converted one at a time and reuse the original
parameters, so converting never doubles the model's memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from torch import nn

from afm.config import AnalogConfig
from afm.layers import AnalogLinear

logger = logging.getLogger(__name__)

Selector = str | re.Pattern | Iterable[str | re.Pattern] | None


def _patterns(selector: Selector) -> list[re.Pattern] | None:
    if selector is None:
        return None
    if isinstance(selector, (str, re.Pattern)):
        selector = [selector]
    return [s if isinstance(s, re.Pattern) else re.compile(s) for s in selector]


def _matches(name: str, patterns: list[re.Pattern]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix, or as a regex search."""
    for p in patterns:
        if p.pattern == name or name.endswith("." + p.pattern) or p.search(name):
            return True
    return False


def _is_convertible(module: nn.Module) -> bool:
    if isinstance(module, AnalogLinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _lm_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        elif name == "lm_head" or name.endswith(".lm_head"):
            names.add(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    inc, exc = _patterns(include), _patterns(exclude)
    over = [(re.compile(k), v) for k, v in (overrides or {}).items()]
    heads = _lm_head_names(model)
    in_emb = None
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        try:
            in_emb = get_in()
        except NotImplementedError:
            in_emb = None
    targets = []
    for name, module in model.named_modules():
        if not name or not _is_convertible(module):
            continue
        if name in heads and not convert_lm_head:
            continue
        if inc is not None and not _matches(name, inc):
            continue
        if exc is not None and _matches(name, exc):
            continue
        targets.append(name)
    untied = False
    for name in targets:
        module = model.get_submodule(name)
        layer_cfg = next((cfg for pat, cfg in over if _matches(name, [pat])), config)
        layer = AnalogLinear.from_linear(module, layer_cfg)
        if in_emb is not None and layer.weight is getattr(in_emb, "weight", None):
            # An analog head must not share (and later clip) the embedding table.
            layer.weight = nn.Parameter(
                layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
            )
            untied = True
        _set_module(model, name, layer)
    if untied and hasattr(model, "config"):
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    logger.info("afm.convert: %d layers converted to AnalogLinear", len(targets))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Put digital layers back (bitwise-identical weights); ``input_range`` is dropped."""
    names = [n for n, m in model.named_modules() if isinstance(m, AnalogLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_linear())
    hf_config = getattr(model, "config", None)
    if hf_config is not None and getattr(hf_config, "quantization_config", None) is not None:
        qc = hf_config.quantization_config
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        )
        if str(getattr(method, "value", method)) == "afm":
            del hf_config.quantization_config
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            if hasattr(model, "is_quantized"):
                model.is_quantized = False
    logger.info("afm.revert: %d layers reverted", len(names))
    return model


def analog_layers(model: nn.Module) -> dict[str, AnalogLinear]:
    """``{qualified name: layer}`` for every ``AnalogLinear`` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLinear)}
