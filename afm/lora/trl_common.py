"""What afm's TRL modes share (``afm.lora.sft``, ``afm.lora.grpo``): the TRL version
check, the pinned trainer settings, the chip monitor and the training wrapper.

The trainers get the ``PeftModel`` made by :func:`afm.lora.attach_lora` /
:func:`afm.lora.load_adapter` (afm's :class:`~afm.lora.layer.AnalogLoraLinear`, merging
refused) as it is, so TRL never builds a peft model of its own.  What afm pins, and why:

* fp32, no gradient checkpointing (TRL defaults to bf16 and to checkpointing; the
  recomputed forward would draw new analog noise and give wrong gradients), no vLLM
  (it would run the weights digitally); an analog output head is scored through the
  model's own forward (:mod:`afm.lora.trl_head`), not TRL's fused LM head, which reads
  ``lm_head.weight`` directly;
* analog layers in training mode for every forward of the trainer — the loss, and in
  GRPO the rollouts and their log-probabilities — each drawing its noise from its own
  seeded generator; a forward pre-hook counts the forwards by mode and the run fails
  if one ran without the noise (``noise=False`` keeps them in eval mode instead: the
  noise-free baseline);
* after training: the layers are still afm's and only adapter parameters are
  trainable; the model is left in eval mode.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from afm.analog.layers import AnalogLinear
from afm.analog.noise.apply import seeded_noise
from afm.lora.layer import AnalogLoraLinear, PeftLoraLinear, PeftModel, analog_lora_layers
from afm.lora.model import freeze_base_
from afm.lora.trl_head import install_analog_head_logprobs

TRL_MIN_VERSION = "1.16"
TRL_MAX_VERSION = "2"  # exclusive
TRL_REQUIREMENT = f"trl>={TRL_MIN_VERSION},<{TRL_MAX_VERSION}"

try:
    import trl
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"afm.lora's SFT/GRPO modes need TRL ({TRL_REQUIREMENT}): pip install 'afm[trl]' ({_err})"
    ) from _err

__all__ = [
    "PINNED",
    "PINNED_GRPO",
    "TRL_REQUIREMENT",
    "AnalogForwards",
    "TrlResult",
    "check_analog_peft_model",
    "check_trl_version",
    "has_analog_head",
    "config_kwargs",
    "seeded_noise",
    "train_with",
]

logger = logging.getLogger(__name__)

#: TRL / TrainingArguments fields afm sets itself (``trl_args`` may not override them).
_CHECKPOINTING = (  # transformers 5.2x renamed it; the old name is a deprecated alias
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
PINNED = {
    "bf16": False,
    "fp16": False,
    _CHECKPOINTING: False,
    "use_liger_kernel": False,
    "torch_compile": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
}
#: GRPO's too: vLLM would generate with the weights digitally.
PINNED_GRPO = {**PINNED, "use_vllm": False}


def check_trl_version(version: str) -> None:
    """Raise ``ImportError`` unless ``TRL_MIN_VERSION <= version < TRL_MAX_VERSION``."""
    from packaging.version import Version

    v = Version(Version(version).base_version)
    if not Version(TRL_MIN_VERSION) <= v < Version(TRL_MAX_VERSION):
        raise ImportError(
            f"afm.lora's SFT/GRPO modes need {TRL_REQUIREMENT} (they rely on how those "
            f"versions build the peft model, generate and compute the loss), but trl {version} "
            f"is installed: pip install '{TRL_REQUIREMENT}'"
        )


check_trl_version(trl.__version__)


@dataclass
class TrlResult:
    """What a TRL run did: TRL's log, the evaluation curve, analog forwards by mode."""

    mode: str
    steps: int = 0
    seconds: float = 0.0
    noise: bool = True
    log: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    """``{"step", "values"}``: the ``evaluate`` callback's scores (one per seed)."""
    forwards: dict[str, int] = field(default_factory=dict)
    """Analog-layer forwards by mode: ``train`` / ``eval`` × ``grad`` / ``no_grad``."""

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of one logged quantity (``loss``, ``reward``, ...)."""
        return [(int(e["step"]), float(e[key])) for e in self.log if key in e and "step" in e]

    @property
    def final(self) -> dict[str, float]:
        """The last logged training values (``loss``; GRPO: ``reward``, ...)."""
        steps = [e for e in self.log if "step" in e and "train_runtime" not in e]
        return dict(steps[-1]) if steps else {}


# --------------------------------------------------------------------------- the chip


class AnalogForwards:
    """Forward pre-hooks on every analog layer: count forwards by (mode, grad mode)
    while active; with ``force_eval`` put each layer in eval mode first (noise off)."""

    def __init__(self, model: nn.Module, *, force_eval: bool) -> None:
        self.force_eval = force_eval
        self.counts = {f"{m}/{g}": 0 for m in ("train", "eval") for g in ("grad", "no_grad")}
        self.active = True
        self._handles = [
            m.register_forward_pre_hook(self._hook)
            for m in model.modules()
            if isinstance(m, AnalogLinear)
        ]

    def _hook(self, module: nn.Module, args: Any) -> None:
        if not self.active:
            return
        if self.force_eval:
            module.training = False
        mode = "train" if module.training else "eval"
        self.counts[f"{mode}/{'grad' if torch.is_grad_enabled() else 'no_grad'}"] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.active, was = False, self.active
        try:
            yield
        finally:
            self.active = was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def check(self, noise: bool, rollouts: bool) -> None:
        """Fail loudly if the trainer ran the chip in the wrong mode."""
        c = self.counts
        wrong = (
            c["eval/grad"] + c["eval/no_grad"] if noise else c["train/grad"] + c["train/no_grad"]
        )
        if wrong:
            state = "without the hardware noise (eval mode)" if noise else "with noise"
            raise RuntimeError(
                f"{wrong} analog-layer forwards ran {state} during training ({c}); the "
                "installed TRL changed how it runs the model, so the result would not be "
                f"hardware-aware as asked. Use {TRL_REQUIREMENT}"
            )
        if rollouts and c[("train" if noise else "eval") + "/no_grad"] == 0:
            raise RuntimeError(f"no rollout ran through the analog layers ({c})")
        if c["train/grad"] + c["eval/grad"] == 0:
            raise RuntimeError(f"no training forward ran through the analog layers ({c})")


def has_analog_head(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    head = head.get_base_layer() if hasattr(head, "get_base_layer") else head
    return isinstance(head, AnalogLinear)


def check_analog_peft_model(model: nn.Module) -> None:
    """The model TRL gets: a ``PeftModel`` with afm's layers and trainable adapters."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            "train an afm adapter: pass the PeftModel from afm.lora.attach_lora or "
            f"afm.lora.load_adapter(..., is_trainable=True), not a {type(model).__name__}"
        )
    if not analog_lora_layers(model):
        raise ValueError(
            "the PeftModel has no afm AnalogLoraLinear layers (built with plain peft?): "
            "use afm.lora.attach_lora / load_adapter so that merging stays refused"
        )
    stock = [
        n
        for n, m in model.named_modules()
        if isinstance(m, PeftLoraLinear)
        and not isinstance(m, AnalogLoraLinear)
        and isinstance(m.get_base_layer(), AnalogLinear)
    ]
    if stock:
        raise ValueError(f"analog layers wrapped by peft's stock LoRA layer: {stock[:3]}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the adapter has no trainable parameters: attach one with afm.lora.attach_lora or "
            "load it with afm.lora.load_adapter(..., is_trainable=True)"
        )


def config_kwargs(
    trl_args: Mapping[str, Any] | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
    device: torch.device,
    pinned: Mapping[str, Any] = PINNED,
) -> dict[str, Any]:
    extra = dict(trl_args or {})
    clash = sorted(set(extra) & set(pinned))
    if clash:
        pinned_text = ", ".join(f"{k}={pinned[k]!r}" for k in clash)
        raise ValueError(f"trl_args {clash}: afm sets these itself ({pinned_text})")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive int")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is invalid: must be > 0")
    return {
        "max_steps": steps,
        "learning_rate": lr,
        "per_device_train_batch_size": batch_size,
        "seed": seed,
        "data_seed": seed,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "disable_tqdm": not progress,
        "use_cpu": device.type == "cpu",
        "dataloader_num_workers": 0,
        **pinned,
        **extra,
    }


class _CurveCallback(TrainerCallback):
    """``evaluate(model)`` at step 0 and every ``every`` steps, the chip monitor paused."""

    def __init__(self, model, evaluate, every: int, forwards: AnalogForwards, out: list) -> None:
        self.model, self.evaluate, self.every = model, evaluate, every
        self.forwards, self.out = forwards, out

    def _point(self, step: int) -> None:
        with self.forwards.paused(), torch.no_grad():
            values = [float(v) for v in self.evaluate(self.model)]
        self.out.append({"step": step, "values": values})
        logger.info("step %d: evaluation %s", step, values)
        self.model.train()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._point(0)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._point(state.global_step)


def train_with(
    mode: str,
    make_trainer: Callable[[list, str], Any],
    peft_model: nn.Module,
    *,
    output_dir: str | None,
    seed: int,
    noise: bool,
    progress: bool,
    evaluate: Callable[[nn.Module], Sequence[float]] | None,
    eval_every: int,
) -> TrlResult:
    check_analog_peft_model(peft_model)
    freeze_base_(peft_model)
    if evaluate is not None and eval_every < 1:
        raise ValueError(f"eval_every={eval_every!r} is invalid: must be >= 1 with evaluate")
    result = TrlResult(mode, noise=noise)
    forwards = AnalogForwards(peft_model, force_eval=not noise)
    callbacks = (
        [_CurveCallback(peft_model, evaluate, eval_every, forwards, result.curve)]
        if evaluate is not None
        else []
    )
    t0 = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix=f"afm-{mode}-") if output_dir is None else None
    try:
        with seeded_noise(peft_model, seed, f"afm-lora-{mode}"):
            trainer = make_trainer(callbacks, output_dir or scratch.name)
            if has_analog_head(peft_model):  # TRL's fused head would read lm_head.weight
                temperature = float(getattr(trainer.args, "temperature", 1.0))
                install_analog_head_logprobs(peft_model.get_base_model(), temperature)
            if not progress:  # TrainingArguments(disable_tqdm=True) prints the logs instead
                trainer.remove_callback(PrinterCallback)
            if trainer.model is not peft_model:
                raise RuntimeError("TRL replaced the afm PeftModel; refusing to train")
            trainer.train()
    finally:
        forwards.remove()
        peft_model.eval()
        if scratch is not None:
            scratch.cleanup()
    result.seconds = time.perf_counter() - t0
    result.steps = int(trainer.state.global_step)
    result.log = [dict(e) for e in trainer.state.log_history]
    result.forwards = dict(forwards.counts)
    forwards.check(noise, rollouts=mode == "grpo")
    check_analog_peft_model(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    base = [n for n in trainable if "lora_" not in n and "modules_to_save" not in n]
    if base:
        raise RuntimeError(f"non-adapter parameters became trainable during training: {base[:3]}")
    return result
