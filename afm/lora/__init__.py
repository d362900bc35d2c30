"""AHWA-LoRA: digital peft LoRA adapters on a frozen analog base.

On a chip the analog weights are programmed once.  AHWA-LoRA (Li et al. 2024/2025)
keeps them fixed and adapts the model with small *digital* LoRA adapters:

* every targeted :class:`~afm.analog.layers.AnalogLinear` is wrapped by
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

``import afm`` does not import this package (nor peft); use ``import afm.lora``
(``pip install 'afm[peft]'``).  Modules: ``layer`` (the peft layer and the merge
guard), ``model`` (attach / load / freeze), ``train`` (the adapter training loop),
``experiment`` (``afm-lora`` end to end).  With TRL (``pip install 'afm[trl]'``, imported
only by these modules): ``sft`` (``SFTTrainer``), ``grpo`` (``GRPOTrainer``),
``trl_common`` (what afm pins and checks), ``rewards``, ``instruct_data``, ``trl_eval``,
``trl_experiment`` (``afm-lora --mode sft|grpo``).

>>> import afm, afm.lora
>>> model = afm.lora.load_analog_base("tiny", preset="ahwa-lora")
>>> peft_model = afm.lora.attach_lora(model, r=8, alpha=32)
>>> print(afm.lora.trainable_report(peft_model))
"""

from afm.analog.calibration import calibrate_on_texts
from afm.lora.experiment import evaluate_under_noise
from afm.lora.layer import (
    PEFT_REQUIREMENT,
    AnalogLoraLinear,
    AnalogMergeError,
    analog_lora_layers,
    check_peft_version,
    register_analog_lora,
)
from afm.lora.model import (
    TrainableReport,
    attach_lora,
    freeze_base_,
    load_adapter,
    load_analog_base,
    trainable_report,
)
from afm.lora.train import TrainResult, completion_loss, train_adapter

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
