"""Issue 15 §2: plain peft on an analog model can no longer merge silently.

``peft.get_peft_model(analog_model, LoraConfig(...))`` (not ``afm.lora``) wraps
``AnalogLinear`` in peft's stock LoRA layer; its ``merge_and_unload()`` used to add the
digital adapter to the analog weights and change the logits.  After ``import afm`` every
merge path of such a layer raises ``AnalogMergeError`` and leaves the model as it was.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import afm  # noqa: E402
from afm.analog.guards import AnalogMergeError  # noqa: E402

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def _stock_lora(model, targets=("q_proj", "v_proj")):
    # init_lora_weights=False: a non-zero adapter, so a merge would change the weights
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter", "safe_merge"])
def test_stock_merge_into_analog_weights_is_refused(tiny_model, merge):
    pm = _stock_lora(afm.convert(tiny_model("llama"), afm.get_preset("afm-paper")))
    before_logits, before_state = pm(IDS).logits, _state(pm)
    with pytest.raises(AnalogMergeError, match="stock peft Linear layer wraps an AnalogLinear"):
        if merge == "merge_and_unload":
            pm.merge_and_unload()
        elif merge == "merge_adapter":
            pm.merge_adapter()
        else:
            pm.merge_and_unload(safe_merge=True)
    after = _state(pm)
    assert all(torch.equal(after[k], v) for k, v in before_state.items())
    assert torch.equal(pm(IDS).logits, before_logits)


def test_unload_and_disable_still_work_and_give_the_analog_base(tiny_model):
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"))
    base_logits = model(IDS).logits
    pm = _stock_lora(model)
    with pm.disable_adapter():
        assert torch.equal(pm(IDS).logits, base_logits)
    base = pm.unload()
    assert len(afm.analog_layers(base)) == 14 and torch.equal(base(IDS).logits, base_logits)


def test_stock_adapter_loaded_from_disk_is_guarded_too(tiny_model, tmp_path):
    chip = afm.get_preset("afm-paper")
    _stock_lora(afm.convert(tiny_model("llama"), chip)).save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(afm.convert(tiny_model("llama"), chip), tmp_path)
    with pytest.raises(AnalogMergeError):
        loaded.merge_and_unload()


def test_mixed_targets_never_give_wrong_logits(tiny_model):
    """A plain Linear target may merge before the analog one refuses: merging into a
    digital layer is exact, so the model's logits stay those of the adapted model."""
    model = afm.convert(tiny_model("llama"), afm.get_preset("afm-paper"), include=["q_proj"])
    pm = _stock_lora(model)  # q_proj analog, v_proj digital
    adapted = pm(IDS).logits
    with pytest.raises(AnalogMergeError):
        pm.merge_and_unload()
    torch.testing.assert_close(pm(IDS).logits, adapted, rtol=1e-5, atol=1e-6)


def test_digital_models_merge_as_before(tiny_model):
    model = tiny_model("llama")
    pm = _stock_lora(model)
    adapted = pm(IDS).logits
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(IDS).logits, adapted, rtol=1e-5, atol=1e-6)
