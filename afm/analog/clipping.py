"""Weight clipping after every optimizer step (spec §3).

Clipping acts on the parameters the optimizer updates: with mixed precision
those are the fp32 master weights the optimizer holds, so the hook runs as an
optimizer step post-hook (or as a Trainer callback) rather than inside forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from afm.analog.experts import AnalogExperts
from afm.analog.layers import AnalogLinear
from afm.config import ClipKind


@torch.no_grad()
def clip_weights_(model: nn.Module) -> int:
    """Clip every analog layer's weight in place per its config (each MoE expert's matrices
    on their own); returns the modules clipped."""
    count = 0
    for module in model.modules():
        if not isinstance(module, (AnalogLinear, AnalogExperts)):
            continue
        if module.analog_config.clip.kind is not ClipKind.NONE:
            module.clip_weights_()
            count += 1
    return count


def register_clip_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Clip ``model``'s analog weights after every ``optimizer.step()``; returns the handle."""

    def _hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        clip_weights_(model)

    return optimizer.register_step_post_hook(_hook)


def clip_callback():
    """A ``transformers.TrainerCallback`` that clips analog weights after each optimizer step.

    The callback clips the model the Trainer passes to it (``kwargs["model"]``), which is
    the unwrapped model for DDP.  Engines that keep separate fp32 master copies (DeepSpeed
    ZeRO, FSDP with mixed precision) need the clipping on those copies: afm.training
    handles that through ``register_clip_hook`` on the engine's optimizer.
    """
    from transformers import TrainerCallback

    class ClipWeightsCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is not None:
                clip_weights_(model)

    return ClipWeightsCallback()
