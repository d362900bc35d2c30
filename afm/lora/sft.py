"""Instruction tuning of afm's analog-aware adapters with TRL's ``SFTTrainer``, the
analog base frozen and its chip (hardware noise) active in the loss
(:mod:`afm.lora.trl_common` says what afm pins and checks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from afm.lora.trl_common import TrlResult, config_kwargs, train_with

__all__ = ["sft_adapter"]


def sft_adapter(
    peft_model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    noise: bool = True,
    max_length: int | None = 1024,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    output_dir: str | None = None,
    progress: bool = True,
    evaluate: Callable[[nn.Module], Sequence[float]] | None = None,
    eval_every: int = 0,
    trl_args: Mapping[str, Any] | None = None,
) -> TrlResult:
    """Supervised (instruction) tuning of the active adapter with TRL's ``SFTTrainer``.

    ``dataset``: a ``datasets.Dataset`` in one of TRL's formats — ``prompt`` /
    ``completion`` (strings, or conversational message lists: the loss is on the
    completion only), ``messages`` (conversational; ``assistant_only_loss=True`` puts
    the loss on the assistant turns), or ``text`` (the loss on everything).
    Conversational data needs ``tokenizer.chat_template``.  ``evaluate(model)`` (scores
    per noise seed) runs at step 0 and every ``eval_every`` steps.  ``trl_args``: more
    ``SFTConfig`` fields (not those in ``PINNED``).
    """
    from trl import SFTConfig, SFTTrainer

    device = next(peft_model.parameters()).device
    kwargs = config_kwargs(
        trl_args,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        device=device,
    )

    def make(callbacks: list, out: str) -> Any:
        args = SFTConfig(
            output_dir=out,
            max_length=max_length,
            completion_only_loss=completion_only_loss,
            assistant_only_loss=assistant_only_loss,
            **kwargs,
        )
        return SFTTrainer(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    return train_with(
        "sft",
        make,
        peft_model,
        output_dir=output_dir,
        seed=seed,
        noise=noise,
        progress=progress,
        evaluate=evaluate,
        eval_every=eval_every,
    )
