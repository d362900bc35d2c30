"""Issue 15 §1: a checkpoint always keeps its chip.

A plain ``save_pretrained`` after ``afm.convert`` writes the hardware config (as the
layers are when saved), loads back analog with identical logits, and a checkpoint
whose chip or tensors are missing or damaged is an error naming what is wrong.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

import afm
from afm.analog.hf import AfmQuantizationConfig
from afm.analog.load_checks import DamagedCheckpointError, MissingChipError
from afm.config import set_by_path

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def _analog(model, preset="afm-paper"):
    afm.convert(model, afm.get_preset(preset))
    with torch.no_grad():
        for i, layer in enumerate(afm.analog_layers(model).values()):
            layer.input_range.fill_(1.0 + 0.1 * i)  # not the init value: loaded, not reset
    return model


def _config_json(path):
    return json.loads((path / "config.json").read_text())


def _edit_config(path, fn):
    cfg = _config_json(path)
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _assert_same_analog_model(loaded, model):
    assert set(afm.analog_layers(loaded)) == set(afm.analog_layers(model))
    for name, layer in afm.analog_layers(loaded).items():
        original = afm.analog_layers(model)[name]
        assert layer.analog_config == original.analog_config, name
        assert torch.equal(layer.input_range, original.input_range), name
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plain_save_pretrained_writes_the_chip(tiny_model, tmp_path, arch):
    model = _analog(tiny_model(arch))
    model.save_pretrained(tmp_path)  # no attach_quantization_config
    qc = _config_json(tmp_path)["quantization_config"]
    assert qc["quant_method"] == "afm"
    assert qc["config"] == afm.get_preset("afm-paper").to_dict()
    assert qc["modules"] == sorted(afm.analog_layers(model))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_analog_model(loaded, model)


def test_saved_chip_is_the_layers_chip_when_saved_not_at_convert(tiny_model, tmp_path):
    model = _analog(tiny_model("llama"))
    layer = model.model.layers[1].mlp.up_proj
    harsher = set_by_path(afm.get_preset("afm-paper"), "weight_noise.std", 0.09)
    layer.set_config(harsher)  # after convert: a snapshot taken then would be stale
    model.save_pretrained(tmp_path)
    qc = _config_json(tmp_path)["quantization_config"]
    assert qc["overrides"] == {"model.layers.1.mlp.up_proj": harsher.to_dict()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.up_proj.analog_config == harsher
    _assert_same_analog_model(loaded, model)


def test_set_chip_on_a_loaded_model_is_what_the_next_save_writes(tiny_model, tmp_path):
    model = _analog(tiny_model("llama"))
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    afm.set_chip(loaded, afm.get_preset("tiny-stress"))
    loaded.save_pretrained(tmp_path / "b")
    qc = _config_json(tmp_path / "b")["quantization_config"]
    assert qc["config"] == afm.get_preset("tiny-stress").to_dict() and qc["overrides"] == {}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    _assert_same_analog_model(again, loaded)


def test_second_round_trip_is_identical(tiny_model, tmp_path):
    model = _analog(tiny_model("llama"))
    model.save_pretrained(tmp_path / "a")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert (
        _config_json(tmp_path / "a")["quantization_config"]
        == _config_json(tmp_path / "b")["quantization_config"]
    )
    _assert_same_analog_model(second, model)


def test_revert_then_save_is_a_digital_checkpoint(tiny_model, tmp_path):
    digital = tiny_model("llama")
    ref = digital(IDS).logits
    model = afm.revert(_analog(digital))
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in _config_json(tmp_path)
    assert not any(
        k.endswith("input_range") for k in load_file(str(tmp_path / "model.safetensors"))
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not afm.analog_layers(loaded)
    assert torch.equal(loaded(IDS).logits, ref)


def test_bf16_with_device_map(tiny_model, tmp_path):
    model = _analog(tiny_model("llama").to(torch.bfloat16))
    model.save_pretrained(tmp_path / "a")
    kwargs = dict(dtype=torch.bfloat16, device_map="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", **kwargs)
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.input_range.dtype == torch.float32
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # Logits are compared load against load: transformers itself casts the rotary
    # inv_freq buffer to bf16 in model.to(bf16) but keeps it fp32 when loading in bf16.
    loaded.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", **kwargs)
    _assert_same_analog_model(again, loaded)


def test_deepcopy_describes_the_copy(tiny_model):
    model = _analog(tiny_model("llama"))
    twin = copy.deepcopy(model)
    afm.set_chip(twin, afm.get_preset("ahwa-lora"))
    assert twin.config.quantization_config.analog_config == afm.get_preset("ahwa-lora")
    assert model.config.quantization_config.analog_config == afm.get_preset("afm-paper")


def test_names_are_the_checkpoints_inside_an_activation_checkpointing_wrapper(tiny_model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _analog(tiny_model("llama"))
    names = sorted(afm.analog_layers(model))
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    assert any("_checkpoint_wrapped_module" in n for n in afm.analog_layers(model))
    assert model.config.quantization_config.modules == names


# --------------------------------------------------------------------------- loading


def test_input_ranges_without_an_afm_config_are_an_error(tiny_model, tmp_path):
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(MissingChipError, match="no afm quantization_config") as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "input_range" in message and "\n" not in message


def test_stating_the_chip_on_load_keeps_the_stored_ranges(tiny_model, tmp_path):
    model = _analog(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: cfg.pop("quantization_config"))
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=AfmQuantizationConfig("afm-paper")
    )
    _assert_same_analog_model(loaded, model)


def test_ranges_of_layers_the_config_does_not_list(tiny_model, tmp_path):
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_config(
        tmp_path,
        lambda cfg: cfg["quantization_config"]["modules"].remove("model.layers.0.mlp.up_proj"),
    )
    with pytest.raises(DamagedCheckpointError, match="model.layers.0.mlp.up_proj.input_range"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda qc: qc.pop("config"), "'config' is missing"),
        (lambda qc: qc.update(config={}), "lacks backend, clip, input"),
        (lambda qc: qc["config"]["input"].pop("bits"), "lacks input.bits"),
        (lambda qc: qc.update(modules=[]), "selects no layer of this model"),
        (
            lambda qc: qc.update(overrides={"model.layers.0.mlp.up_proj": {}}),
            r"overrides\['model.layers.0.mlp.up_proj'\] lacks",
        ),
    ],
)
def test_a_damaged_afm_config_names_the_key(tiny_model, tmp_path, edit, message):
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: edit(cfg["quantization_config"]))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_no_default_chip_is_ever_substituted():
    with pytest.raises(ValueError, match="'config' is missing"):
        AfmQuantizationConfig()
    assert AfmQuantizationConfig("afm-paper").analog_config == afm.get_preset("afm-paper")


def test_missing_input_range_tensors_are_an_error(tiny_model, tmp_path):
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_weights(tmp_path, lambda t: t.pop("model.layers.1.self_attn.o_proj.input_range"))
    with pytest.raises(DamagedCheckpointError, match="model.layers.1.self_attn.o_proj.input_range"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _poison(key, value):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return edit


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.layers.0.mlp.down_proj.weight", float("nan"), "non-finite"),
        ("model.layers.0.mlp.down_proj.input_range", float("inf"), "non-finite"),
        ("model.layers.0.mlp.down_proj.input_range", 0.0, "non-positive input range"),
    ],
)
def test_damaged_tensors_name_tensor_and_file(tiny_model, tmp_path, key, value, message):
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_weights(tmp_path, _poison(key, value))
    with pytest.raises(DamagedCheckpointError, match=message) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert key in str(err.value) and "model.safetensors" in str(err.value)


# --------------------------------------------------------------------------- import afm


def test_without_import_afm_plain_transformers_loads_digital_and_afm_models_does_not(
    tiny_model, tmp_path
):
    """What the README warns about, and that afm's loader registers the quantizer by
    itself (importing afm.models imports the afm package first)."""
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        plain = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert "afm" not in sys.modules
        print("plain", type(plain.model.layers[0].mlp.up_proj).__name__)
        from afm.models import load_model
        print("afm", type(load_model({str(tmp_path)!r}).model.layers[0].mlp.up_proj).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "plain Linear" in out and "afm AnalogLinear" in out


def test_import_afm_before_transformers_models_still_checks_keys(tiny_model, tmp_path):
    """import afm does not import transformers' modeling code (it pulls in triton); the
    key checks are installed when the first model is built, before its weights load."""
    _analog(tiny_model("llama")).save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: cfg.pop("quantization_config"))
    script = textwrap.dedent(
        f"""
        import sys
        import afm
        assert "transformers.modeling_utils" not in sys.modules
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        except afm.analog.load_checks.MissingChipError as err:
            print("refused:", err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "refused:" in out and "no afm quantization_config" in out


def test_load_model_refuses_to_run_without_the_quantizer(monkeypatch, tmp_path):
    from afm.models import load_model

    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "afm")
    with pytest.raises(RuntimeError, match="quantizer is not registered"):
        load_model(tmp_path)
