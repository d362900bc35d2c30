"""afm-import end to end: IBM-layout checkpoints written with aihwkit-lightning and dill,
imported, loaded with plain ``from_pretrained`` and compared with aihwkit-lightning's
own model (noise off; the tolerance of tests/test_aihwkit_parity.py)."""

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import afm  # noqa: F401  (registers the "afm" quantizer)
from afm.analog.layers import AnalogLinear
from afm.cli.import_afm import main
from afm.interop import (
    REPORT_FILE,
    MissingFilesError,
    StateMismatchError,
    UnsupportedRpuConfig,
    import_ibm_afm,
)


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal up to rare ADC rounding ties (float summation order), as the parity tests."""
    diff = (ours - theirs).abs()
    assert torch.allclose(ours, theirs, atol=1e-5) or (diff > 1e-5).float().mean() < 0.005, (
        f"max |diff| {diff.max().item():.3g}, {(diff > 1e-5).sum().item()} of {diff.numel()}"
    )


def _import_and_load(ckpt, tmp_path, **kwargs):
    out = tmp_path / "afm"
    summary = import_ibm_afm(ckpt.path, out, **kwargs)
    return AutoModelForCausalLM.from_pretrained(out), summary, out


CASES = [
    # (model, max_input_size, per-channel bounds, state-dict layout)
    ("llama", None, True, "single"),
    ("llama", 24, True, "shards+index"),
    ("llama", 16, False, "single"),
    ("phi3", None, False, "shards"),
    ("phi3", 24, True, "shards+index"),
]


@pytest.mark.parametrize(("kind", "tile", "per_channel", "layout"), CASES)
def test_imported_logits_match_aihwkit_lightning(
    lightning_checkpoint, rpu_config, tmp_path, kind, tile, per_channel, layout
):
    rpu = rpu_config(max_input_size=tile, per_channel=per_channel)
    ckpt = lightning_checkpoint(kind, rpu, layout=layout)
    model, summary, out = _import_and_load(ckpt, tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AnalogLinear)}
    theirs = {n for n, m in ckpt.model.named_modules() if type(m).__name__ == "AnalogLinear"}
    assert "lm_head" in layers and set(layers) == theirs and summary.analog_layers == len(theirs)
    assert summary.tiles == (1 if tile is None else math.ceil(64 / tile))
    cfg = layers["lm_head"].analog_config
    assert cfg.max_input_size == tile and cfg.input.bits == 8 and cfg.output.bound == 14.0
    assert cfg.clip.per_channel is per_channel
    assert summary.ranges_calibrated and cfg.input.init_steps == 0
    for name, layer in layers.items():  # the learned ranges came across, in fp32
        theirs = ckpt.model.get_submodule(name).input_range
        assert layer.input_range.dtype == torch.float32
        torch.testing.assert_close(layer.input_range.data, theirs.data.float(), rtol=0, atol=0)
    x = ckpt.tokens()
    with torch.no_grad():
        assert_parity(model(x).logits, ckpt.model(x).logits)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["input_range_update_idx"] == {
        "init_from_data": 2,
        "min": 2,
        "max": 2,
        "ranges_calibrated": True,
    }


def test_tied_llama_head_keeps_its_own_trained_weight(lightning_checkpoint, tmp_path):
    ckpt = lightning_checkpoint("llama")
    with torch.no_grad():  # as after training: the analog head drifted from the embedding
        ckpt.model.lm_head.weight.add_(0.01)
    torch.save(ckpt.model.state_dict(), ckpt.path / "pytorch_model.bin")
    model, summary, _ = _import_and_load(ckpt, tmp_path)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, ckpt.model.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, ckpt.model.model.embed_tokens.weight)
    assert any("tie_word_embeddings=False" in n for n in summary.notes)
    x = ckpt.tokens(seed=3)
    with torch.no_grad():
        assert_parity(model(x).logits, ckpt.model(x).logits)


def test_output_noise_per_layer_matches_lightning(lightning_checkpoint, rpu_config, tmp_path):
    """aihwkit-lightning scales out_noise by 1/√tiles: the same noise per layer in afm."""
    rpu = rpu_config(
        max_input_size=16,
        **{"forward.out_noise": 0.04, "modifier.std_dev": 0.0, "forward.out_res": -1},
        **{"forward.out_bound": 0.0, "pre_post.input_range.init_from_data": 0},
    )
    ckpt = lightning_checkpoint("llama", rpu, calibrate=0)
    model, _, _ = _import_and_load(ckpt, tmp_path)
    for name, tiles in (
        ("model.layers.0.self_attn.q_proj", 2),
        ("model.layers.0.mlp.down_proj", 4),
    ):
        ours, theirs = model.get_submodule(name), ckpt.model.get_submodule(name)
        assert ours.analog_config.output_noise.std == pytest.approx(0.04 / math.sqrt(tiles))
        x = torch.randn(256, ours.in_features, generator=torch.Generator().manual_seed(5))
        stds = []
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.eval()
                clean = layer(x)
                layer.train()
                stds.append(torch.stack([layer(x) - clean for _ in range(6)]).std().item())
                layer.eval()
        assert stds[0] == pytest.approx(stds[1], rel=0.05), name


def test_version_1_modifier_type_and_uncalibrated_ranges(
    lightning_checkpoint, rpu_config, tmp_path
):
    """aihwkit-lightning 1's ``modifier.type`` decides the noise type, as version 2 maps it."""
    from aihwkit_lightning.simulator.configs import WeightModifierType, WeightNoiseInjectionType

    rpu = rpu_config()
    rpu.modifier.noise_type = WeightNoiseInjectionType.NONE
    rpu.modifier.type = WeightModifierType.ADD_NORMAL
    with pytest.warns(UserWarning, match="deprecated"):
        ckpt = lightning_checkpoint("phi3", rpu, calibrate=0)
    model, summary, _ = _import_and_load(ckpt, tmp_path)
    cfg = model.lm_head.analog_config
    assert cfg.weight_noise.kind is afm.WeightNoiseKind.ADD_GAUSS and cfg.weight_noise.std == 0.03
    assert not summary.ranges_calibrated and cfg.input.init_steps == 2  # still to be done
    x = ckpt.tokens(seed=2)
    with torch.no_grad():
        assert_parity(model(x).logits, ckpt.model(x).logits)


def test_partial_range_initialisation_is_refused(lightning_checkpoint, tmp_path):
    ckpt = lightning_checkpoint("llama", calibrate=1)  # 1 of init_from_data=2 batches
    with pytest.raises(
        UnsupportedRpuConfig, match="input_range_update_idx.*1 of .*init_from_data=2"
    ):
        import_ibm_afm(ckpt.path, tmp_path / "afm")
    assert not (tmp_path / "afm").exists()


def test_state_dict_config_copy_must_match_rpu_config(lightning_checkpoint, tmp_path):
    import dill

    ckpt = lightning_checkpoint("llama")
    ckpt.rpu_config.forward.out_bound = 10.0
    with open(ckpt.path / "rpu_config", "wb") as f:
        dill.dump(ckpt.rpu_config, f)
    with pytest.raises(UnsupportedRpuConfig, match=r"forward.out_bound=14 \(rpu_config: 10.0\)"):
        import_ibm_afm(ckpt.path, tmp_path / "afm")


def test_fp16_weights_stay_fp16_and_bitwise(lightning_checkpoint, tmp_path):
    ckpt = lightning_checkpoint("llama")
    state = {k: v.half() for k, v in ckpt.model.state_dict().items()}
    torch.save(state, ckpt.path / "pytorch_model.bin")
    out = tmp_path / "afm"
    import_ibm_afm(ckpt.path, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float16 and q.input_range.dtype == torch.float32
    assert torch.equal(q.weight, state["model.layers.0.self_attn.q_proj.weight"])


def test_weights_that_do_not_fit_config_json_are_refused(lightning_checkpoint, tmp_path):
    ckpt = lightning_checkpoint("llama")
    state = ckpt.model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, ckpt.path / "pytorch_model.bin")
    with pytest.raises(
        StateMismatchError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        import_ibm_afm(ckpt.path, tmp_path / "afm")
    assert not (tmp_path / "afm").exists()


def test_nothing_from_aihwkit_lightning_or_dill_is_imported(
    lightning_checkpoint, tmp_path, monkeypatch
):
    ckpt = lightning_checkpoint("phi3", layout="shards")
    for name in list(sys.modules):
        if name.split(".")[0] in ("aihwkit_lightning", "dill"):
            monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    import_ibm_afm(ckpt.path, tmp_path / "afm")
    assert (tmp_path / "afm" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the CLI
def test_cli_writes_checkpoint_and_prints_summary(lightning_checkpoint, tmp_path, capsys):
    ckpt = lightning_checkpoint("llama")
    (ckpt.path / "tokenizer_config.json").write_text("{}")
    assert main([str(ckpt.path), "--out", str(tmp_path / "afm"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "afm-import: wrote" in out and "15 analog layers" in out
    assert (tmp_path / "afm" / "tokenizer_config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("rpu_config", "rpu_config"),
        ("pytorch_model-00002-of-00002.bin", "pytorch_model-00002-of-00002.bin"),
        ("config.json", "config.json"),
    ],
)
def test_cli_missing_files_one_line_error(lightning_checkpoint, tmp_path, capsys, remove, named):
    ckpt = lightning_checkpoint("phi3", layout="shards")
    (ckpt.path / remove).unlink()
    assert main([str(ckpt.path), "--out", str(tmp_path / "afm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("afm-import: error: ") and "\n" not in err
    assert f"missing {named}" in err
    assert not (tmp_path / "afm").exists()


def test_cli_without_hub_names_the_missing_files(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main(["ibm-aimc/analog-Llama-3.2-1B-Instruct", "--out", str(tmp_path / "afm")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("afm-import: error: ") and "\n" not in err
    assert "could not be fetched from the Hugging Face Hub" in err
    for name in ("config.json", "rpu_config", "pytorch_model.bin"):
        assert name in err


def test_missing_weights_and_non_empty_output(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "pytorch_model-00001-of-00003.bin").write_bytes(b"")
    with pytest.raises(MissingFilesError, match="missing rpu_config, pytorch_model-00002-of-00003"):
        import_ibm_afm(tmp_path / "src", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        import_ibm_afm(tmp_path / "src", tmp_path / "out")


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "afm-import"]
    assert script.value == "afm.cli.import_afm:main"
