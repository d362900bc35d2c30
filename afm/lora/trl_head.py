"""TRL's fused LM head, for a model whose output head is analog.

TRL's trainers patch ``model.forward`` (``trl.trainer.utils.add_fused_lm_head``) so
that ``model(..., labels=..., fused_lm_head=True)`` projects the backbone's hidden
states with ``lm_head.weight`` directly, in chunks: for an analog head
(``AnalogLinear``: clipping, quantization, noise) that would silently score the
tokens with a digital head.  :func:`install_analog_head_logprobs` replaces that patch
with one that runs the model's own forward — the analog head included — and computes
the same per-token fields (``FusedCausalLMOutput``) from the full logits.  It costs
the full ``(batch, seq, vocab)`` logits, as a plain forward does.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

__all__ = ["install_analog_head_logprobs", "token_fields"]


def token_fields(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per-token fields of TRL's ``FusedCausalLMOutput`` from next-token ``logits``
    (``[B, T, V]``, already aligned with ``labels`` ``[B, T]``; ``-100`` ignored):
    every field is zero where the label is ignored."""
    mask = labels != -100
    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    target = labels.clamp(min=0).unsqueeze(-1)
    log_probs = logp.gather(-1, target).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0.0)
        mean_logits = scaled.mean(-1).masked_fill(~mask, 0.0)
        is_top1 = (scaled.argmax(-1) == labels) & mask
    return {
        "log_probs": log_probs,
        "entropy": entropy,
        "log_sum_sq_probs": log_sum_sq,
        "mean_logits": mean_logits,
        "is_top1": is_top1,
        "label_mask": mask,
    }


def install_analog_head_logprobs(model: nn.Module, temperature: float = 1.0) -> None:
    """Make ``model(..., fused_lm_head=True)`` score through the model's own (analog)
    head; ``model`` is the transformers model TRL patched (``peft_model.get_base_model()``)."""
    from trl.trainer.utils import FusedCausalLMOutput

    original = types.MethodType(type(model).forward, model)

    @functools.wraps(type(model).forward)
    def forward(
        self: nn.Module,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            for key, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[key] = value
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        logits = original(*args, **kwargs).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        fields = token_fields(logits, labels.to(logits.device), temperature)
        mask = fields["label_mask"]
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / denom, **fields)

    model.forward = types.MethodType(forward, model)
