"""Reinforcement learning of afm's analog-aware adapters with TRL's ``GRPOTrainer``:
the rollouts, their log-probabilities and the loss all run on the noisy analog base
(:mod:`afm.lora.trl_common` says what afm pins and checks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from afm.lora.layer import PeftModel
from afm.lora.trl_common import PINNED_GRPO, TrlResult, config_kwargs, train_with

__all__ = ["grpo_adapter"]


def grpo_adapter(
    peft_model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    rewards: Sequence[Callable[..., Sequence[float | None]]],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    num_generations: int = 8,
    max_completion_length: int = 64,
    temperature: float = 1.0,
    beta: float = 0.0,
    seed: int = 0,
    noise: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    output_dir: str | None = None,
    progress: bool = True,
    evaluate: Callable[[nn.Module], Sequence[float]] | None = None,
    eval_every: int = 0,
    trl_args: Mapping[str, Any] | None = None,
) -> TrlResult:
    """RL of the active adapter with TRL's ``GRPOTrainer`` (rollouts on the noisy chip).

    ``dataset``: a ``datasets.Dataset`` with a ``prompt`` column (string or
    conversational) and whatever columns the rewards read (they get them as keyword
    arguments, e.g. ``answer``).  ``rewards``: TRL reward functions
    (:mod:`afm.lora.rewards`).  ``batch_size`` completions per step, ``num_generations``
    per prompt (``batch_size`` must be a multiple of it).  ``beta > 0`` adds the KL term
    to the reference policy, which TRL computes with the adapter disabled or as a frozen
    copy of a loaded adapter — on the same noisy base.  ``stop_token_ids``: extra tokens
    that end a completion (besides EOS).
    """
    from trl import GRPOConfig, GRPOTrainer

    if not rewards:
        raise ValueError("grpo_adapter needs at least one reward function")
    if num_generations < 2 or batch_size % num_generations:
        raise ValueError(
            f"num_generations={num_generations} is invalid with batch_size={batch_size}: "
            "need >= 2 generations per prompt and batch_size a multiple of it"
        )
    if (
        beta != 0.0
        and isinstance(peft_model, PeftModel)
        and "default" not in peft_model.peft_config
    ):
        raise ValueError(
            "beta > 0 needs the adapter to be named 'default' (TRL copies it as the frozen "
            "reference adapter by that name)"
        )
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length} is invalid: must be >= 1")
    device = next(peft_model.parameters()).device
    kwargs = config_kwargs(
        trl_args,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        device=device,
        pinned=PINNED_GRPO,
    )
    gen = peft_model.generation_config
    saved_eos = gen.eos_token_id

    def make(callbacks: list, out: str) -> Any:
        if stop_token_ids:
            eos = (
                []
                if saved_eos is None
                else [saved_eos]
                if isinstance(saved_eos, int)
                else list(saved_eos)
            )
            gen.eos_token_id = [*eos, *[t for t in stop_token_ids if t not in eos]]
        args = GRPOConfig(
            output_dir=out,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            temperature=temperature,
            beta=beta,
            **kwargs,
        )
        return GRPOTrainer(
            model=peft_model,
            reward_funcs=list(rewards),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    try:
        return train_with(
            "grpo",
            make,
            peft_model,
            output_dir=output_dir,
            seed=seed,
            noise=noise,
            progress=progress,
            evaluate=evaluate,
            eval_every=eval_every,
        )
    finally:
        gen.eos_token_id = saved_eos
        _drop_ref_adapter(peft_model)


def _drop_ref_adapter(peft_model: nn.Module) -> None:
    """GRPO with ``beta > 0`` on a loaded adapter adds a frozen "ref" copy; drop it so
    ``save_pretrained`` writes the trained adapter only."""
    if isinstance(peft_model, PeftModel) and "ref" in peft_model.peft_config:
        active = peft_model.active_adapter
        peft_model.delete_adapter("ref")
        peft_model.set_adapter(active)
