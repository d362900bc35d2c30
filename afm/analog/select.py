"""Which modules of a model are which: the one home of afm's selection rules.

* :func:`is_conv1d` / :func:`is_linear_like` — a GPT-2 ``Conv1D`` or an ``nn.Linear``;
* :func:`name_matches` — does a module name match include / exclude / skip patterns;
* :func:`check_patterns_match` — every pattern a caller passed selects something (an
  error listing the closest layer names otherwise: a typo is never a silent no-op);
* :func:`output_head_names` / :func:`untie_word_embeddings` — the output head and its
  tie to the input embedding;
* :func:`is_adapter_name` — peft adapter matrices (``...q_proj.lora_A.default``);
* :func:`set_module` — put a module in place of another, by qualified name.

Convert, deployment noise, RTN-W4, export, the transformers quantizer and LoRA all
ask these functions, so a rule means the same thing everywhere.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

from torch import nn

__all__ = [
    "PatternMatchError",
    "Selector",
    "check_patterns_match",
    "closest_names",
    "unmatched_error",
    "compile_patterns",
    "input_embedding_weight",
    "is_adapter_name",
    "is_conv1d",
    "is_linear_like",
    "name_matches",
    "output_head_names",
    "set_module",
    "untie_word_embeddings",
]

Selector = str | re.Pattern | Iterable[str | re.Pattern] | None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``), found by its class
    name and ``nf`` attribute so that transformers need not be imported to ask."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (subclasses included, e.g. ``AnalogLinear``) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def compile_patterns(selector: Selector) -> list[re.Pattern] | None:
    """``None`` stays None (no filter); a string, pattern or iterable of them → patterns."""
    if selector is None:
        return None
    if isinstance(selector, (str, re.Pattern)):
        selector = [selector]
    return [s if isinstance(s, re.Pattern) else re.compile(s) for s in selector]


def name_matches(name: str, patterns: Iterable[str | re.Pattern]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix (``"lm_head"`` matches
    ``"model.lm_head"``), or as a regular-expression search (``"^model\\.layers\\.0\\."``)."""
    for p in patterns:
        text = p.pattern if isinstance(p, re.Pattern) else p
        if text == name or name.endswith("." + text):
            return True
        try:
            regex = p if isinstance(p, re.Pattern) else re.compile(p)
        except re.error:  # not a regular expression: a plain name, already compared
            continue
        if regex.search(name):
            return True
    return False


class PatternMatchError(ValueError):
    """A name pattern (include / exclude / overrides / skip / LoRA targets) selects nothing."""


def closest_names(pattern: str | re.Pattern, names: Iterable[str], n: int = 3) -> list[str]:
    """The names, or their dotted suffixes (``"q_proj"``, ``"self_attn.q_proj"``), closest
    to ``pattern`` by difflib's ratio (at least 0.5); [] when none is close."""
    text = pattern.pattern if isinstance(pattern, re.Pattern) else str(pattern)
    # Short patterns are compared with the suffixes a user would type, not only with long
    # qualified names (whose ratio to "q_prj" is always low).
    suffixes = {
        ".".join(parts[i:])
        for parts in (name.split(".") for name in names)
        for i in range(len(parts))
    }
    return difflib.get_close_matches(text, sorted(suffixes), n=n, cutoff=0.5)


PatternMatcher = Callable[[str, str | re.Pattern], bool]


def _default_matcher(name: str, pattern: str | re.Pattern) -> bool:
    return name_matches(name, [pattern])


def check_patterns_match(
    what: str,
    patterns: Iterable[str | re.Pattern] | None,
    names: Iterable[str],
    *,
    matches: PatternMatcher = _default_matcher,
    among: str = "layer",
) -> None:
    """Raise :class:`PatternMatchError` if a pattern matches none of ``names``.

    Args:
        what: where the patterns came from, for the message (``"afm.convert: include"``).
        patterns: the caller's patterns (None: nothing to check).
        names: the names the patterns may select (e.g. the model's linear layers).
        matches: ``matches(name, pattern)``; default :func:`name_matches`.
        among: what ``names`` are, for the message (``"linear layer"``).
    """
    if patterns is None:
        return
    names = list(names)
    unmatched = [p for p in patterns if not any(matches(n, p) for n in names)]
    if unmatched:
        raise unmatched_error(what, unmatched, names, among=among)


def unmatched_error(
    what: str, unmatched: Iterable[str | re.Pattern], names: Iterable[str], *, among: str = "layer"
) -> PatternMatchError:
    """The one-line error for patterns that select nothing, with the closest names."""
    names = list(names)
    parts = []
    for p in unmatched:
        text = p.pattern if isinstance(p, re.Pattern) else str(p)
        close = closest_names(p, names)
        parts.append(f"{text!r} (closest: {', '.join(close)})" if close else repr(text))
    examples = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    return PatternMatchError(
        f"{what}: {'; '.join(parts)} {'matches' if len(parts) == 1 else 'match'} no {among} "
        f"of the model; its {len(names)} {among}s are named like {examples or '(none)'}"
    )


def output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head: ``get_output_embeddings()`` and any module
    called ``lm_head``."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    names = set()
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        elif name == "lm_head" or name.endswith(".lm_head"):
            names.add(name)
    return names


def input_embedding_weight(model: nn.Module) -> nn.Parameter | None:
    """The input embedding table (None when the model has none)."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        return None
    try:
        emb = get_in()
    except (NotImplementedError, AttributeError):
        return None
    return getattr(emb, "weight", None)


def untie_word_embeddings(model: nn.Module) -> None:
    """Record in ``model.config`` that the output head no longer shares the embedding
    (so ``save_pretrained`` / ``from_pretrained`` keep the two apart)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False


def is_adapter_name(name: str) -> bool:
    """Modules that belong to a peft LoRA adapter (``...q_proj.lora_A.default``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (a qualified name) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
