"""An analog base with digital LoRA adapters: attach, load, freeze, count (AHWA-LoRA).

On a chip the analog weights are programmed once.  AHWA-LoRA (Li et al. 2024/2025)
keeps them fixed and adapts the model with small *digital* LoRA adapters
(:mod:`afm.lora.layer`): the analog path (weights, bias, ``input_range``) and
everything else stay frozen; hardware noise stays active on the analog path in
``model.train()``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402,I001  (after the check)
from torch import nn

from afm.analog.calibration import calibrate_on_texts
from afm.analog.convert import convert
from afm.analog.hf import is_afm_checkpoint_config
from afm.analog.layers import AnalogLinear, analog_layers
from afm.analog.select import (
    check_patterns_match,
    is_adapter_name,
    name_matches,
    output_head_names,
)
from afm.lora.layer import (  # first: checks the peft version before peft is used
    AnalogLoraLinear,
    PeftLoraLinear,
    analog_lora_layers,
    install_merge_guard,
    register_analog_lora,
)
from afm.models import load_model, resolve_model
from afm.presets import analog_head_of, get_preset

logger = logging.getLogger(__name__)

__all__ = [
    "TrainableReport",
    "attach_lora",
    "freeze_base_",
    "load_adapter",
    "load_analog_base",
    "trainable_report",
]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _default_targets(model: nn.Module) -> list[str]:
    """Every analog layer but the output head (peft's ``all-linear`` rule too): an
    adapter on a head tied to the embedding would make peft save the embedding
    matrix with every adapter, and TRL refuses an adapter there.  Pass ``targets``
    to adapt the head anyway."""
    analog = {
        n.removesuffix(".base_layer")  # already wrapped by a LoRA layer (a second adapter)
        for n, m in model.named_modules()
        if isinstance(m, AnalogLinear)
    }
    if not analog:
        raise ValueError(
            "the model has no AnalogLinear layers: convert it first "
            "(afm.convert(model, afm.get_preset('ahwa-lora'))) or load an afm checkpoint"
        )
    layers = analog - output_head_names(model)
    if not layers:
        raise ValueError("afm.lora: the model has no analog layer besides its output head")
    leaves = sorted({_leaf(n) for n in layers})
    # Leaf names are short and portable; fall back to full names when a leaf name
    # also matches a digital layer (which the default must not target).
    for name, module in model.named_modules():
        if (
            _leaf(name) in leaves
            and name not in layers
            and isinstance(module, (nn.Linear, PeftLoraLinear))
            and not isinstance(module, AnalogLoraLinear)
        ):
            return sorted(layers)
    return leaves


def _module_names(model: nn.Module) -> list[str]:
    """What peft matches targets against: module names outside adapters (a layer that
    already holds an adapter is named as before, without ``.base_layer``)."""
    return [
        n
        for n, _ in model.named_modules()
        if n and not is_adapter_name(n) and "base_layer" not in n.split(".")
    ]


def _peft_list_entry_matches(name: str, entry: str) -> bool:
    """peft's rule for one entry of a ``target_modules`` list: exact name or dotted suffix."""
    return name == entry or name.endswith("." + entry)


def _peft_regex_matches(name: str, regex: str) -> bool:
    """peft's rule for a ``target_modules`` string: a full regex match of the name."""
    return re.fullmatch(regex, name) is not None


def _check_targets(model: nn.Module, option: str, targets: str | Sequence[str] | None) -> None:
    """Every target (peft's matching rules) names a module: a typo is an error listing the
    closest names, not an adapter silently missing from that layer."""
    if targets is None:
        return
    names = _module_names(model)
    if isinstance(targets, str):
        check_patterns_match(
            f"afm.lora: {option}", [targets], names, matches=_peft_regex_matches, among="module"
        )
    else:
        check_patterns_match(
            f"afm.lora: {option}",
            list(targets),
            names,
            matches=_peft_list_entry_matches,
            among="module",
        )


def _check_modules_to_save(model: nn.Module, modules_to_save: Sequence[str] | None) -> None:
    check_patterns_match("afm.lora: modules_to_save", modules_to_save, _module_names(model))
    for target in modules_to_save or ():
        for name, module in model.named_modules():
            if name_matches(name, [target]):
                if any(isinstance(m, AnalogLinear) for m in module.modules()):
                    raise ValueError(
                        f"modules_to_save={target!r} matches {name!r}, which holds analog "
                        "layers: training a copy of them would re-program the chip; "
                        "list digital modules only (e.g. norms, a digital head)"
                    )


def freeze_base_(model: nn.Module) -> None:
    """Freeze every analog parameter (``weight``, ``bias``, ``input_range``) in place.

    peft already freezes all non-adapter parameters; this also undoes
    ``AnalogLinear.set_config``, which re-enables ``input_range`` gradients.
    """
    for module in model.modules():
        if isinstance(module, AnalogLinear):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)


def attach_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 32,
    targets: str | Sequence[str] | None = None,
    adapter_name: str = "default",
    modules_to_save: Sequence[str] | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
    **lora_kwargs: Any,
) -> PeftModel:
    """Attach a digital LoRA adapter to an analog model; returns the ``PeftModel``.

    Args:
        model: a model with ``AnalogLinear`` layers, or a ``PeftModel`` made by this
            function (then a further named adapter is added and made active).
        r, alpha, dropout: LoRA rank, ``lora_alpha`` and ``lora_dropout``.
        targets: peft ``target_modules`` (names or a regex); default: every analog
            layer.  Plain ``nn.Linear`` targets get peft's stock LoRA layer.  A target
            that names no module is an error listing the closest names.
        adapter_name: the adapter's name (several adapters can share one base).
        modules_to_save: digital modules trained and saved alongside (a task head,
            norms); modules holding analog layers are refused.
        seed: seeds the adapter initialisation (``lora_A``) without touching the
            global RNG; None uses torch's global RNG.
        **lora_kwargs: passed to ``LoraConfig`` (e.g. ``lora_bias``, ``use_rslora``).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} is invalid: the LoRA rank must be a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid: must be a positive number")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is invalid: must be in [0, 1)")
    if lora_kwargs.get("use_dora"):
        raise ValueError("use_dora=True is not supported on analog layers (it merges weights)")
    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    if is_peft and adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists on this model")
    _check_modules_to_save(base, modules_to_save)
    _check_targets(base, "targets", targets)
    _check_targets(base, "exclude_modules", lora_kwargs.get("exclude_modules"))
    target_modules: str | list[str]
    if targets is None:
        target_modules = _default_targets(base)
    elif isinstance(targets, str):
        target_modules = targets
    else:
        target_modules = list(targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    register_analog_lora(config)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if is_peft:
            model.add_adapter(adapter_name, config)
            model.set_adapter(adapter_name)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    freeze_base_(peft_model)
    install_merge_guard(peft_model)
    n_analog = sum(
        adapter_name in layer.lora_A for layer in analog_lora_layers(peft_model).values()
    )
    n_plain = sum(
        isinstance(m, PeftLoraLinear)
        and not isinstance(m, AnalogLoraLinear)
        and adapter_name in m.lora_A
        for m in peft_model.modules()
    )
    if n_analog == 0:
        logger.warning("attach_lora: adapter %r targets no analog layer", adapter_name)
    if n_plain:
        logger.warning(
            "attach_lora: adapter %r also targets %d plain (digital) Linear layers",
            adapter_name,
            n_plain,
        )
    logger.info(
        "attach_lora: adapter %r on %d analog layers; %s",
        adapter_name,
        n_analog,
        trainable_report(peft_model),
    )
    return peft_model


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter onto an analog base (or add it to a ``PeftModel``).

    The custom-module registration is not stored in ``adapter_config.json``; it is
    re-registered here, so the afm layer (which refuses merging) comes back rather
    than peft's stock LoRA layer.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)"
        )
    config = register_analog_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists on this model")
        config.inference_mode = not is_trainable
        # Adding it first with the registered config makes load_adapter skip its own
        # (unregistered) config and only load the weights.
        model.add_adapter(adapter_name, config)
        result = model.load_adapter(str(adapter_dir), adapter_name, is_trainable=is_trainable)
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
        if missing:
            raise RuntimeError(
                f"adapter {adapter_dir} does not fit this model: missing {missing[:3]}"
            )
        for name, p in model.named_parameters():
            if f".{adapter_name}." in name + "." and ("lora_" in name or "modules_to_save" in name):
                p.requires_grad_(is_trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(
            model,
            str(adapter_dir),
            adapter_name=adapter_name,
            config=config,
            is_trainable=is_trainable,
        )
    freeze_base_(peft_model)
    install_merge_guard(peft_model)
    return peft_model


# --------------------------------------------------------------------------- reporting


class TrainableReport(NamedTuple):
    """``(trainable, total, pct)``; ``str()`` gives a one-line summary."""

    trainable: int
    total: int
    pct: float

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} / {self.total:,} ({self.pct:.3f} % of the model)"
        )


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():  # deduplicated by torch
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableReport(trainable, total, 100.0 * trainable / total if total else 0.0)


def load_analog_base(
    name_or_path: str | Path,
    *,
    preset: str = "ahwa-lora",
    calibration_texts: Iterable[str] | None = None,
    tokenizer: Any = None,
    calibration_steps: int = 20,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """The frozen analog base: an afm checkpoint as saved, or a plain model converted.

    An afm checkpoint (``quantization_config.quant_method == "afm"``) keeps its own
    hardware model and input ranges (``preset`` is ignored).  A plain HF model (path,
    hub id or afm alias such as ``"tiny"``) is converted with ``preset``; pass
    ``calibration_texts`` (and ``tokenizer``) to initialise its input ranges from data,
    otherwise they stay at the preset's ``init_value``.  Returned in eval mode with
    every parameter frozen.
    """
    resolved = resolve_model(name_or_path)
    model = load_model(resolved, **from_pretrained_kwargs)
    if is_afm_checkpoint_config(getattr(model, "config", None)) and analog_layers(model):
        logger.info("load_analog_base: afm checkpoint %s (its own hardware model)", resolved)
    else:
        convert(model, get_preset(preset), convert_lm_head=analog_head_of(preset))
        if calibration_texts is not None:
            if tokenizer is None:
                raise ValueError("calibration_texts need a tokenizer")
            calibrate_on_texts(model, tokenizer, calibration_texts, max_steps=calibration_steps)
        else:
            logger.warning(
                "load_analog_base: %s converted with %r without calibration: input ranges "
                "stay at init_value",
                resolved,
                preset,
            )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
