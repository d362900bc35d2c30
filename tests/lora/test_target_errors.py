"""Issue 15 §2: a LoRA target that names no module is an error listing the closest names.

peft matches ``target_modules`` by exact name or dotted suffix (a list) or by a full
regex match (a string); it only complains when *nothing* matches, so ``["q_proj",
"v_prj"]`` used to attach to ``q_proj`` alone, silently.
"""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

import afm  # noqa: E402
import afm.lora as L  # noqa: E402


def _analog_llama(tiny_model):
    return afm.convert(tiny_model("llama"), afm.get_preset("ahwa-lora"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["q_proj", "v_prj"]), r"targets: 'v_prj' \(closest: v_proj"),
        (dict(targets=r".*\.no_such_proj"), r"targets: .*no_such_proj' .*matches no module"),
        (dict(modules_to_save=["lm_haed"]), r"modules_to_save: 'lm_haed' \(closest: lm_head"),
        (dict(exclude_modules=["o_prj"]), r"exclude_modules: 'o_prj' \(closest: o_proj"),
    ],
)
def test_targets_that_name_no_module(tiny_model, kwargs, message):
    model = _analog_llama(tiny_model)
    with pytest.raises(ValueError, match=message):
        L.attach_lora(model, r=2, seed=0, **kwargs)
    assert not L.analog_lora_layers(model)


def test_valid_targets_attach_as_before(tiny_model):
    pm = L.attach_lora(_analog_llama(tiny_model), r=2, seed=0, targets=["q_proj", "v_proj"])
    assert len(L.analog_lora_layers(pm)) == 4
    pm = L.attach_lora(_analog_llama(tiny_model), r=2, seed=0, targets=r".*layers\.0\.mlp\.up_proj")
    assert list(L.analog_lora_layers(pm)) == ["base_model.model.model.layers.0.mlp.up_proj"]
