"""Training an adapter on prompt/completion pairs (loss on the completion only).

:func:`train_adapter` is a plain torch loop over the trainable parameters (the adapter
and any ``modules_to_save``) with the analog base frozen and, by default, its hardware
noise on; :func:`completion_loss` scores completions without noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from afm.analog.layers import AnalogLinear
from afm.analog.noise.apply import seeded_noise
from afm.lora.model import freeze_base_
from afm.seeds import derive_seed

logger = logging.getLogger(__name__)

__all__ = [
    "EncodedPairs",
    "TrainResult",
    "collate_pairs",
    "completion_loss",
    "encode_pairs",
    "train_adapter",
]


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
class EncodedPairs:
    ids: list[list[int]]
    n_prompt: list[int]


def encode_pairs(
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    append_eos: bool,
    max_length: int | None,
) -> EncodedPairs:
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
    return EncodedPairs(ids, n_prompt)


def collate_pairs(enc: EncodedPairs, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
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
    enc = encode_pairs(tokenizer, examples, append_eos=append_eos, max_length=max_length)
    pad_id = _pad_id(tokenizer)
    data_gen = torch.Generator().manual_seed(derive_seed("afm-lora", seed, "data"))
    analog = {n: m for n, m in peft_model.named_modules() if isinstance(m, AnalogLinear)}
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
    with seeded_noise(peft_model, seed, "afm-lora"):  # one noise stream per layer
        try:
            bar = tqdm(range(steps), desc="training adapter", disable=not progress)
            for step in bar:
                idx = []
                while len(idx) < batch_size:
                    if not order:
                        order = torch.randperm(len(enc.ids), generator=data_gen).tolist()
                    idx.append(order.pop())
                batch = {k: v.to(device) for k, v in collate_pairs(enc, idx, pad_id).items()}
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
    enc = encode_pairs(tokenizer, examples, append_eos=append_eos, max_length=None)
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(enc.ids), batch_size):
            idx = list(range(i, min(i + batch_size, len(enc.ids))))
            batch = {k: v.to(device) for k, v in collate_pairs(enc, idx, pad_id).items()}
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
