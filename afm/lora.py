"""AHWA-LoRA: digital peft LoRA adapters on a frozen analog base.

On a chip the analog weights are programmed once.  AHWA-LoRA (Li et al. 2024/2025)
keeps them fixed and adapts the model with small *digital* LoRA adapters:

* every targeted :class:`~afm.layers.AnalogLinear` is wrapped by
  :class:`AnalogLoraLinear`, a subclass of ``peft.tuners.lora.Linear`` registered
  through peft's custom-module extension point
  (``LoraConfig._register_custom_module({AnalogLinear: AnalogLoraLinear})``), so peft
  never silently treats the analog layer as a plain ``nn.Linear``;
* the analog path (weights, bias, ``input_range``) and everything else stay frozen;
  the adapter path ``B(A(x))·scaling`` sees the *unclipped* input and runs digitally
  (no input/output quantization, no noise); hardware noise stays active on the
  analog path in ``model.train()``;
* merging is refused (it would re-program the chip and put the adapter under analog
  noise), before anything is merged, also when some targets are plain Linear layers;
  ``unload()`` and ``disable_adapter()`` work;
* the registration is not saved in ``adapter_config.json``: :func:`load_adapter`
  re-registers it on load.

``import afm`` does not import this module (nor peft); use ``import afm.lora``
(``pip install 'afm[peft]'``).

>>> import afm, afm.lora
>>> model = afm.lora.load_analog_base("tiny", preset="ahwa-lora")
>>> peft_model = afm.lora.attach_lora(model, r=8, alpha=32)
>>> print(afm.lora.trainable_report(peft_model))
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from afm.layers import AnalogLinear

logger = logging.getLogger(__name__)

#: The peft versions whose custom-module dispatch afm relies on (same as the extra).
PEFT_MIN_VERSION = "0.15"
PEFT_MAX_VERSION = "0.23"  # exclusive
PEFT_REQUIREMENT = f"peft>={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION}"


def check_peft_version(version: str) -> None:
    """Raise ``ImportError`` unless ``PEFT_MIN_VERSION <= version < PEFT_MAX_VERSION``."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        raise ImportError(
            f"afm.lora: cannot parse the installed peft version {version!r}; "
            f"afm.lora needs {PEFT_REQUIREMENT} (pip install 'afm[peft]')"
        ) from None
    if not (Version(PEFT_MIN_VERSION) <= Version(v.base_version) < Version(PEFT_MAX_VERSION)):
        raise ImportError(
            f"afm.lora needs {PEFT_REQUIREMENT} (it relies on LoraConfig._register_custom_module "
            f"and the lora.Linear layer API of those versions), but peft {version} is installed; "
            f"install a supported version: pip install '{PEFT_REQUIREMENT}'"
        )


try:
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import Linear as _PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"afm.lora needs peft ({PEFT_REQUIREMENT}): pip install 'afm[peft]' ({_err})"
    ) from _err

check_peft_version(peft.__version__)

__all__ = [
    "PEFT_REQUIREMENT",
    "AnalogLoraLinear",
    "AnalogMergeError",
    "TrainResult",
    "TrainableReport",
    "analog_lora_layers",
    "attach_lora",
    "calibrate_on_texts",
    "check_peft_version",
    "completion_loss",
    "evaluate_under_noise",
    "freeze_base_",
    "load_adapter",
    "load_analog_base",
    "register_analog_lora",
    "train_adapter",
    "trainable_report",
]


class AnalogMergeError(RuntimeError):
    """Merging a LoRA adapter into analog weights was requested (always refused)."""


_MERGE_HELP = (
    "merging a LoRA adapter into analog weights is refused: it would re-program the "
    "chip (slow, wears the devices) and put the adapter's delta under clipping, "
    "quantization and analog noise. Keep the adapter digital (it runs beside the analog "
    "layer), use unload() to get the analog base back, or disable_adapter() to run "
    "without it. To merge into a digital model, revert first: afm.revert(base) on the "
    "unloaded model, then attach and merge there."
)


# --------------------------------------------------------------------------- the layer


class AnalogLoraLinear(_PeftLoraLinear):
    """peft LoRA beside an :class:`AnalogLinear`: ``y = analog(x) + B(A(drop(x)))·s``.

    The analog base runs its own forward (clipping, quantization, and noise in
    training mode); the adapter is a plain digital ``nn.Linear`` pair that sees the
    unclipped input ``x``.  :meth:`merge` always raises :class:`AnalogMergeError`.
    Only vanilla LoRA is supported (no DoRA or other weight-merging variants, which
    read the analog weight digitally).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, AnalogLinear):
            raise TypeError(f"AnalogLoraLinear wraps AnalogLinear, got {type(base).__name__}")
        super().__init__(base_layer, adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        out = super().update_layer(adapter_name, *args, **kwargs)
        if adapter_name in getattr(self, "lora_variant", {}):
            variant = type(self.lora_variant[adapter_name]).__name__
            self.delete_adapter(adapter_name)
            raise ValueError(
                f"afm.lora supports vanilla LoRA on analog layers only; {variant} (e.g. "
                f"use_dora=True) reads the analog weight digitally and is not supported"
            )
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise AnalogMergeError(_MERGE_HELP)

    def unmerge(self) -> None:  # nothing can ever be merged
        return None

    def __repr__(self) -> str:
        return "afm." + super().__repr__()


def register_analog_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`AnalogLoraLinear` for ``AnalogLinear`` on ``config`` (in place)."""
    config._register_custom_module({AnalogLinear: AnalogLoraLinear})
    return config


def analog_lora_layers(model: nn.Module) -> dict[str, AnalogLoraLinear]:
    """``{name: layer}`` of every afm LoRA layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLoraLinear)}


# --------------------------------------------------------------------------- merge guard


def _tuner(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PeftModel) else model


def _check_no_analog_merge(tuner: nn.Module, adapter_names: Sequence[str] | None) -> None:
    names = set(adapter_names) if adapter_names is not None else None
    offending = []
    for name, layer in analog_lora_layers(tuner).items():
        wanted = names if names is not None else set(layer.active_adapters)
        if wanted & set(layer.lora_A.keys()):
            offending.append(name)
    if offending:
        shown = ", ".join(offending[:3]) + (" ..." if len(offending) > 3 else "")
        raise AnalogMergeError(f"{_MERGE_HELP} (analog LoRA layers: {shown}; nothing was merged)")


def _guarded_merge_and_unload(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    _check_no_analog_merge(self, kwargs.get("adapter_names"))
    return type(self).merge_and_unload(self, *args, **kwargs)


def _guarded_merge_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    adapter_names = kwargs.get("adapter_names", args[0] if args else None)
    _check_no_analog_merge(self, adapter_names)
    return type(self).merge_adapter(self, *args, **kwargs)


def _install_merge_guard(model: nn.Module) -> None:
    """Check *before* merging anything, so mixed targets are never half-merged."""
    tuner = _tuner(model)
    for name, fn in (
        ("merge_and_unload", _guarded_merge_and_unload),
        ("merge_adapter", _guarded_merge_adapter),
    ):
        if hasattr(type(tuner), name):
            object.__setattr__(tuner, name, types.MethodType(fn, tuner))


# --------------------------------------------------------------------------- attaching


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _default_targets(model: nn.Module) -> list[str]:
    layers = {
        n.removesuffix(".base_layer")  # already wrapped by a LoRA layer (a second adapter)
        for n, m in model.named_modules()
        if isinstance(m, AnalogLinear)
    }
    if not layers:
        raise ValueError(
            "the model has no AnalogLinear layers: convert it first "
            "(afm.convert(model, afm.get_preset('ahwa-lora'))) or load an afm checkpoint"
        )
    leaves = sorted({_leaf(n) for n in layers})
    # Leaf names are short and portable; fall back to full names when a leaf name
    # also matches a digital layer (which the default must not target).
    for name, module in model.named_modules():
        if (
            _leaf(name) in leaves
            and name not in layers
            and isinstance(module, (nn.Linear, _PeftLoraLinear))
            and not isinstance(module, AnalogLoraLinear)
        ):
            return sorted(layers)
    return leaves


def _check_modules_to_save(model: nn.Module, modules_to_save: Sequence[str] | None) -> None:
    for target in modules_to_save or ():
        for name, module in model.named_modules():
            if name == target or name.endswith("." + target):
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
            layer.  Plain ``nn.Linear`` targets get peft's stock LoRA layer.
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
    _install_merge_guard(peft_model)
    n_analog = sum(
        adapter_name in layer.lora_A for layer in analog_lora_layers(peft_model).values()
    )
    n_plain = sum(
        isinstance(m, _PeftLoraLinear)
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
    _install_merge_guard(peft_model)
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


# --------------------------------------------------------------------------- data


def _pair(example: Any) -> tuple[str, str]:
    if isinstance(example, Mapping):
        return str(example["prompt"]), str(example["completion"])
    if isinstance(example, (tuple, list)) and len(example) == 2:
        return str(example[0]), str(example[1])
    prompt = getattr(example, "prompt", None)
    completion = getattr(example, "completion", None)
    if completion is None:
        completion = getattr(example, "solution", None)
    if prompt is None or completion is None:
        raise TypeError(
            "examples must be (prompt, completion) pairs, dicts with 'prompt'/'completion', "
            f"or objects with .prompt and .completion/.solution; got {type(example).__name__}"
        )
    return str(prompt), str(completion)


@dataclass
class _Encoded:
    ids: list[list[int]]
    n_prompt: list[int]


def _encode(
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    append_eos: bool,
    max_length: int | None,
) -> _Encoded:
    """Prompt and completion tokenized separately (as at inference) and concatenated."""
    pairs = [_pair(e) for e in examples]
    if not pairs:
        raise ValueError("no examples given")
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True).input_ids
    comps = tokenizer([c for _, c in pairs], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    ids, n_prompt = [], []
    for p, c in zip(prompts, comps, strict=True):
        c = list(c) + ([eos] if append_eos and eos is not None else [])
        seq = list(p) + c
        if max_length is not None:
            seq = seq[:max_length]
        ids.append(seq)
        n_prompt.append(min(len(p), len(seq)))
    return _Encoded(ids, n_prompt)


def _collate(enc: _Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(enc.ids[i]) for i in idx)
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        seq = torch.tensor(enc.ids[i], dtype=torch.long)
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        labels[row, enc.n_prompt[i] : len(seq)] = seq[enc.n_prompt[i] :]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"afm-lora:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train_adapter` did: per-step losses and timing."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    noise: bool = True
    adapter_name: str = "default"

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else float("nan")


def train_adapter(
    peft_model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    noise: bool = True,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.1,
    grad_clip: float | None = 1.0,
    max_length: int | None = None,
    append_eos: bool = True,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the active adapter on prompt/completion pairs (loss on the completion only).

    A plain torch loop: AdamW over the trainable parameters (the adapter and any
    ``modules_to_save``), linear warm-up then cosine decay to ``min_lr_ratio·lr``,
    gradient clipping.  With ``noise=True`` the analog layers are in training mode
    (weight and output noise resampled every forward, AHWA-LoRA); ``noise=False``
    keeps them in eval mode (input/output quantization only) as a noise-free baseline.
    Deterministic given ``seed``: batches come from a seeded ``torch.Generator`` and
    each analog layer draws its noise from its own seeded generator (the global RNG
    is not used).  The base stays frozen (checked).  The model is left in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: must be a positive int")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive int")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is invalid: must be > 0")
    from tqdm.auto import tqdm

    freeze_base_(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (attach an adapter first)")
    device = next(peft_model.parameters()).device
    enc = _encode(tokenizer, examples, append_eos=append_eos, max_length=max_length)
    pad_id = _pad_id(tokenizer)
    data_gen = torch.Generator().manual_seed(_seed_for(seed, "data"))
    analog = {n: m for n, m in peft_model.named_modules() if isinstance(m, AnalogLinear)}
    saved_gens = {n: m.noise_generator for n, m in analog.items()}
    for n, m in analog.items():
        m.noise_generator = torch.Generator().manual_seed(_seed_for(seed, n))
    base_params = (
        {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
        if logger.isEnabledFor(logging.DEBUG)
        else None
    )
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    n_warm = int(round(warmup * steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return lr * (step + 1) / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    result = TrainResult(noise=noise, adapter_name=str(getattr(peft_model, "active_adapter", "")))
    order: list[int] = []
    peft_model.train()
    if not noise:
        for m in analog.values():
            m.eval()
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(steps), desc="training adapter", disable=not progress)
        for step in bar:
            idx = []
            while len(idx) < batch_size:
                if not order:
                    order = torch.randperm(len(enc.ids), generator=data_gen).tolist()
                idx.append(order.pop())
            batch = {k: v.to(device) for k, v in _collate(enc, idx, pad_id).items()}
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = peft_model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            value = float(loss.detach())
            result.losses.append(value)
            if callback is not None:
                callback(step, value)
            bar.set_postfix(loss=f"{value:.4f}")
    finally:
        for n, m in analog.items():
            m.noise_generator = saved_gens[n]
        peft_model.eval()
    result.steps = steps
    result.seconds = time.perf_counter() - t0
    if base_params is not None:
        for n, p in peft_model.named_parameters():
            if n in base_params and not torch.equal(base_params[n], p.detach()):
                raise RuntimeError(f"frozen parameter {n} changed during adapter training")
    return result


@torch.no_grad()
def completion_loss(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 32,
    append_eos: bool = True,
) -> float:
    """Mean per-token NLL of the completions given the prompts (model in eval mode)."""
    enc = _encode(tokenizer, examples, append_eos=append_eos, max_length=None)
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(enc.ids), batch_size):
            idx = list(range(i, min(i + batch_size, len(enc.ids))))
            batch = {k: v.to(device) for k, v in _collate(enc, idx, pad_id).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()[:, :-1]
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(nll)
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / max(1, count)


# --------------------------------------------------------------------------- base models


def calibrate_on_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    batch_size: int = 16,
    max_steps: int = 20,
    progress: bool = False,
) -> int:
    """Calibrate the analog input ranges (spec §2.4) on a few batches of ``texts``."""
    import afm

    texts = list(texts)
    if not texts:
        raise ValueError("no calibration texts given")

    def batches() -> Iterable[dict[str, torch.Tensor]]:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    return afm.calibrate_input_ranges_(model, batches(), max_steps=max_steps, progress=progress)


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
    import afm
    from afm.hf import is_afm_checkpoint_config
    from afm.models import load_model, resolve_model

    resolved = resolve_model(name_or_path)
    model = load_model(resolved, **from_pretrained_kwargs)
    if is_afm_checkpoint_config(getattr(model, "config", None)) and afm.analog_layers(model):
        logger.info("load_analog_base: afm checkpoint %s (its own hardware model)", resolved)
    else:
        afm.convert(model, afm.get_preset(preset))
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


# --------------------------------------------------------------------------- evaluation


def evaluate_under_noise(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    noise_model: Any = None,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[float]:
    """``evaluate(model)`` once per deployment-noise seed (one programmed chip each).

    ``noise_model`` is an ``afm.noise`` model (e.g. ``get_noise_model("pcm")``) applied
    to the analog layers only (adapters stay digital) and restored bitwise after each
    seed; None evaluates once without deployment noise.  Layer noise depends on the
    seed and the layer name, so every adapter of one ``PeftModel`` (and the base with
    ``disable_adapter()``) sees the same chip for the same seed.
    """
    if noise_model is None:
        return [float(evaluate(model))]
    from afm.noise import apply_noise_

    out = []
    for seed in seeds:
        handle = apply_noise_(model, noise_model, int(seed), only_analog=True)
        try:
            out.append(float(evaluate(model)))
        finally:
            handle.restore()
    return out
