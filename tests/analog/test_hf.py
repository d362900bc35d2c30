import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import afm
from afm.analog.hf import AfmQuantizationConfig
from afm.analog.layers import AnalogLinear


def _convert_and_save(model, path, preset="afm-paper"):
    afm.convert(model, afm.get_preset(preset))
    with torch.no_grad():
        for i, layer in enumerate(afm.analog_layers(model).values()):
            layer.input_range.fill_(1.0 + 0.1 * i)
    afm.attach_quantization_config(model)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_round_trip_identical_logits_and_ranges(tiny_model, tmp_path, arch):
    model = _convert_and_save(tiny_model(arch), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "afm" and qc["version"] == 1
    assert qc["config"] == afm.get_preset("afm-paper").to_dict()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith("input_range") for k in tensors)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(afm.analog_layers(loaded)) == set(afm.analog_layers(model))
    for name, layer in afm.analog_layers(loaded).items():
        assert torch.equal(layer.input_range, afm.analog_layers(model)[name].input_range)
        assert layer.input_range.dtype == torch.float32
        assert not layer.training
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_overrides_survive_round_trip(tiny_model, tmp_path):
    model = tiny_model("llama")
    afm.convert(
        model,
        afm.get_preset("afm-paper"),
        overrides={r"layers\.1\.mlp": afm.get_preset("ahwa-lora")},
    )
    afm.attach_quantization_config(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.up_proj.analog_config == afm.get_preset("ahwa-lora")
    assert loaded.model.layers[0].mlp.up_proj.analog_config == afm.get_preset("afm-paper")


def test_bf16_load_keeps_ranges_fp32(tiny_model, tmp_path):
    _convert_and_save(tiny_model("llama"), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.input_range.dtype == torch.float32
    out = loaded(torch.randint(0, 96, (1, 5))).logits
    assert torch.isfinite(out.float()).all()


def test_convert_plain_checkpoint_on_the_fly(tiny_model, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=AfmQuantizationConfig("afm-paper")
    )
    layers = afm.analog_layers(loaded)
    assert len(layers) == 14 and "lm_head" not in layers
    # input_range is not in a plain checkpoint: initialised, not garbage
    assert all(
        torch.equal(m.input_range, torch.full_like(m.input_range, 3.0)) for m in layers.values()
    )
    torch.testing.assert_close(
        loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda qc: qc.update(version=7), "newer"),
        (lambda qc: qc["config"]["output"].update(bits=1), "bits=1"),
        (lambda qc: qc["config"].update(tiles=4), "unknown keys"),
        (lambda qc: qc.update(foo=1), "unknown keys"),
        (lambda qc: qc.update(modules=["model.nope"]), "model.nope"),
    ],
)
def test_malformed_checkpoint_config_errors(tiny_model, tmp_path, edit, message):
    _convert_and_save(tiny_model("llama"), tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_nothing_is_pickled(tiny_model, tmp_path):
    _convert_and_save(tiny_model("llama"), tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_from_model_requires_analog_layers(tiny_model):
    with pytest.raises(ValueError, match="afm.convert"):
        AfmQuantizationConfig.from_model(tiny_model("llama"))
    assert AnalogLinear  # imported for the type in the docs
