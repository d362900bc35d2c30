"""4-bit compressed-tensors export (afm.export, afm-export) and the W4 baselines."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import afm
from afm.config import ClipKind, WeightNoiseKind
from afm.export.rtn import rtn_w4, select_w4_layers, w4a8_qat_config
from afm.reference import fake_quantize_weight, quantize_input

pytest.importorskip("compressed_tensors")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from afm.cli.export import main as cli_main  # noqa: E402
from afm.export import ExportSummary, export_int4  # noqa: E402

VOCAB = 96
TINY_DIR = Path(afm.__file__).resolve().parent / "assets" / "tiny"


def tiny_model(
    kind: str = "llama", *, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """A random 2-layer model, hidden 128 / intermediate 256 (group 128 divides both)."""
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = {"llama": LlamaConfig, "phi3": Phi3Config, "qwen2": Qwen2Config}[kind](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if kind == "qwen2":  # random biases, so that they are really exported
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.1)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def fake_quantized(model: nn.Module, group_size=None, skip=("lm_head",)) -> nn.Module:
    """The reference: a digital deep copy with RTN-W4 (fake_quantize_weight) weights."""
    ref = afm.revert(copy.deepcopy(model))
    return rtn_w4(ref, group_size=group_size, skip=skip).eval()


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits.float()


def safetensors_header(directory: Path) -> dict[str, dict]:
    """name -> {dtype, shape, nbytes} over every *.safetensors file (header only)."""
    out = {}
    for path in directory.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            out[name] = {"dtype": info["dtype"], "shape": info["shape"], "nbytes": hi - lo}
    return out


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "kind,group_size",
    [("llama", None), ("llama", 128), ("phi3", None), ("phi3", 32), ("qwen2", None), ("qwen2", 64)],
)
def test_export_loads_plain_and_matches_fake_quant(tmp_path, kind, group_size):
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = export_int4(model, tmp_path / "out", group_size=group_size)

    # The caller's model is untouched.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["symmetric"] and weights["type"] == "int"
    assert weights["strategy"] == ("channel" if group_size is None else "group")
    assert weights["group_size"] == group_size

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any(type(m).__name__ == "AnalogLinear" for m in loaded.modules())
    ref = fake_quantized(model, group_size)
    x = ids()
    # fp32: bit-identical to the fake-quantized model.
    assert torch.equal(logits(loaded, x), logits(ref, x))
    # ... and really quantized: not the original model's logits.
    assert not torch.allclose(logits(loaded, x), logits(model, x), atol=1e-4)

    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(summary, ExportSummary)
    assert summary.layers_quantized == n_linear - 1  # all but lm_head
    assert summary.skipped == ("lm_head",)
    assert summary.max_ref_diff == 0.0
    assert 0 < summary.max_abs_error
    # RTN error is at most half a step: Δ/2 = max|W|/14 over the channel / group.
    for layer in summary.layers:
        w = model.get_submodule(layer.name).weight.detach().float()
        assert layer.max_abs_error <= w.abs().max().item() / 14 * (1 + 1e-6)
    text = str(summary)
    assert "total" in text and ("q_proj" in text or "qkv_proj" in text)


def test_export_bf16_sizes_and_logits(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    summary = export_int4(model, tmp_path / "int4", group_size=128)
    dense = safetensors_header(tmp_path / "bf16")
    packed = safetensors_header(tmp_path / "int4")
    assert not any(k.endswith("input_range") for k in packed)

    before = after = 0
    for layer in summary.layers:
        assert f"{layer.name}.weight" not in packed
        on_disk = sum(
            packed[f"{layer.name}.{s}"]["nbytes"]
            for s in ("weight_packed", "weight_scale", "weight_shape")
        )
        assert packed[f"{layer.name}.weight_packed"]["dtype"] == "I32"
        assert packed[f"{layer.name}.weight_scale"]["dtype"] == "BF16"
        assert on_disk == layer.bytes_after
        assert dense[f"{layer.name}.weight"]["nbytes"] == layer.bytes_before
        before += dense[f"{layer.name}.weight"]["nbytes"]
        after += on_disk
    # 4 bits instead of 16, plus one bf16 scale per 128 weights and the shape vector.
    assert 0.25 < after / before < 0.27
    assert summary.ratio == pytest.approx(after / before)
    # Unquantized tensors are copied as they are.
    assert packed["model.embed_tokens.weight"] == dense["model.embed_tokens.weight"]
    assert packed["lm_head.weight"] == dense["lm_head.weight"]
    # Total file: smaller by the quantized layers' savings.
    files = {
        d: sum(p.stat().st_size for p in (tmp_path / d).glob("*.safetensors"))
        for d in ("bf16", "int4")
    }
    assert files["int4"] < files["bf16"] - 0.7 * before

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int4").eval()
    assert loaded.dtype == torch.bfloat16
    ref = fake_quantized(model, 128)
    x = ids()
    # bf16: the scale is rounded to bf16 on disk, the reference keeps it in fp32.
    err = (logits(loaded, x) - logits(ref, x)).abs().max().item()
    spread = (logits(ref, x) - logits(model, x)).abs().max().item()
    assert err < 0.05 and err < spread
    # The summary's error is measured on exactly the weights from_pretrained rebuilds
    # (decompressed to dense weights on the first forward on CPU).
    for layer in summary.layers:
        w = model.get_submodule(layer.name).weight.float()
        w_loaded = loaded.get_submodule(layer.name).weight.float()
        assert (w - w_loaded).abs().max().item() == layer.max_abs_error
    assert summary.max_ref_diff > 0  # documented: about one bf16 ulp of the weight
    for layer in summary.layers:
        w = model.get_submodule(layer.name).weight.detach().float()
        assert layer.max_ref_diff <= w.abs().max().item() * 2**-7


def test_export_analog_model_drops_input_range(tmp_path):
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    layers = afm.analog_layers(model)
    assert layers
    with torch.no_grad():
        for layer in layers.values():
            layer.input_range.fill_(2.5)
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}

    summary = export_int4(model, tmp_path / "out")

    # The analog model is still analog and unchanged.
    assert set(afm.analog_layers(model)) == set(layers)
    for n, m in afm.analog_layers(model).items():
        assert torch.equal(m.weight, weights[n])
        assert torch.all(m.input_range == 2.5)
    header = safetensors_header(tmp_path / "out")
    assert not any("input_range" in k for k in header)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert summary.layers_quantized == len(layers)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not afm.analog_layers(loaded)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(fake_quantized(model), x))


def test_export_from_afm_checkpoint_dir_copies_tokenizer(tmp_path):
    model = tiny_model("qwen2")
    afm.convert(model, afm.get_preset("afm-paper"))
    afm.attach_quantization_config(model)
    model.save_pretrained(tmp_path / "afm")
    tiny_tokenizer().save_pretrained(tmp_path / "afm")

    summary = export_int4(tmp_path / "afm", tmp_path / "out", group_size=128)
    assert summary.tokenizer_saved
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied byte for byte
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "afm" / name).read_bytes()
    src, tok = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("afm", "out"))
    assert tok.get_vocab() == src.get_vocab() and len(tok) == VOCAB
    assert not any("input_range" in k for k in safetensors_header(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    assert torch.equal(logits(loaded, x), logits(fake_quantized(model, 128), x))


def test_export_quantized_tied_head_is_untied(tmp_path):
    model = tiny_model("llama", tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    summary = export_int4(model, tmp_path / "out", skip=())
    assert "lm_head" in {layer.name for layer in summary.layers}
    assert summary.skipped == ()
    assert torch.equal(model.model.embed_tokens.weight, emb)  # caller untouched
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(loaded.model.embed_tokens.weight, emb)  # embedding not quantized
    ref = fake_quantized(model, skip=())
    assert torch.equal(ref.model.embed_tokens.weight, emb)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(ref, x))


# --------------------------------------------------------------------------- refusals
def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_int4(tiny_model(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_int4(tiny_model(), tmp_path / "file")


def test_empty_out_dir_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export_int4(tiny_model(), out)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("group_size", [96, 0, -32, True])
def test_refuses_bad_group_size(tmp_path, group_size):
    with pytest.raises(ValueError, match="group_size") as err:
        export_int4(tiny_model(), tmp_path / "out", group_size=group_size)
    if group_size == 96:
        assert "in_features=128" in str(err.value) and "proj" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_unmerged_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(ValueError, match="LoRA") as err:
        export_int4(model, tmp_path / "out")
    assert "merge_and_unload" in str(err.value)
    assert not (tmp_path / "out").exists()
    # The documented fixes work: export the unloaded base, or merge (digital), then export.
    base = copy.deepcopy(model).unload()
    assert export_int4(base, tmp_path / "base").layers_quantized == 14
    merged = model.merge_and_unload()
    summary = export_int4(merged, tmp_path / "out")
    assert summary.layers_quantized == 14
    assert not any("lora" in k for k in safetensors_header(tmp_path / "out"))


# --------------------------------------------------------------------------- CLI
def test_cli_exports_saved_model(tmp_path, capsys):
    model = tiny_model("phi3")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    code = cli_main(
        ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--group-size", "64"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "total" in captured.out and "group 64" in captured.out
    assert "qkv_proj" in captured.out and "tokenizer copied" in captured.out
    assert (tmp_path / "out" / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    assert torch.equal(logits(loaded, x), logits(fake_quantized(model, 64), x))

    # Bad inputs: exit code 2, one error line, no traceback.
    capsys.readouterr()
    for argv, needle in [
        (["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")], "not empty"),
        (
            [
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "o2"),
                "--group-size",
                "48",
            ],
            "does not divide",
        ),
        (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")], "cannot load"),
        (  # issue 15: a skip typo used to quantize the output head silently
            ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "o5"), "--skip", "lmhead"],
            "'lmhead' (closest: lm_head) matches no linear layer",
        ),
    ]:
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == 2
        errors = [line for line in err.splitlines() if "afm-export" in line]
        assert len(errors) == 1 and errors[0].startswith("afm-export: error: ")
        assert needle in errors[0] and "Traceback" not in err
    assert cli_main(["--out", str(tmp_path / "o4")]) == 2  # argparse usage error
    capsys.readouterr()


def test_cli_skip_names(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    code = cli_main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "out"),
            "--skip",
            "lm_head",
            "down_proj",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "tokenizer NOT copied" in out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    assert "lm_head" in ignore and "model.layers.0.mlp.down_proj" in ignore
    header = safetensors_header(tmp_path / "out")
    assert header["model.layers.1.mlp.down_proj.weight"]["dtype"] == "F32"
    assert "model.layers.1.mlp.up_proj.weight_packed" in header


@pytest.mark.skipif(
    not (TINY_DIR / "config.json").exists(),
    reason="bundled tiny teacher not trained yet (afm/assets/tiny/config.json missing)",
)
def test_export_bundled_tiny_teacher(tmp_path):
    summary = export_int4(TINY_DIR, tmp_path / "out")
    assert summary.layers_quantized > 0 and summary.tokenizer_saved
    assert 0.24 < summary.ratio < 0.3
    source = AutoModelForCausalLM.from_pretrained(TINY_DIR).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(
        3, source.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    ref = fake_quantized(source)
    a, b = logits(loaded, x), logits(ref, x)
    if source.dtype == torch.float32:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() < 0.05 * b.abs().max()


# --------------------------------------------------------------------------- RTN-W4
@pytest.mark.parametrize("group_size", [None, 32])
def test_rtn_w4_in_place(group_size):
    model = tiny_model("qwen2")
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = rtn_w4(model, group_size=group_size)
    assert out is model
    targets, skipped = select_w4_layers(model)
    assert skipped == ["lm_head"]
    assert torch.equal(model.lm_head.weight, orig["lm_head.weight"])
    for name, layer in targets.items():
        w0 = orig[f"{name}.weight"]
        assert torch.equal(layer.weight, fake_quantize_weight(w0, 4, group_size))
        assert torch.equal(layer.bias, orig[f"{name}.bias"]) if layer.bias is not None else True
        rows = layer.weight.reshape(layer.out_features, -1, group_size or layer.in_features)
        scale = w0.reshape(rows.shape).abs().amax(-1, keepdim=True) / 7
        levels = rows / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
        assert levels.abs().max() <= 7 + 1e-4
        assert not torch.equal(layer.weight, w0)


def test_rtn_w4_analog_model_and_errors():
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"))
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    rtn_w4(model)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, afm.AnalogLinear)
    assert torch.equal(layer.weight, fake_quantize_weight(w0))
    with pytest.raises(ValueError, match="does not divide"):
        rtn_w4(tiny_model(), group_size=96)
    with pytest.raises(ValueError, match="group_size"):
        rtn_w4(tiny_model(), group_size=0)


# --------------------------------------------------------------------------- W4A8 QAT
def test_w4a8_qat_config_fields():
    cfg = w4a8_qat_config()
    assert cfg.weight_quant.bits == 4 and cfg.weight_quant.group_size is None
    assert cfg.input.bits == 8 and cfg.input.learn_ranges and not cfg.input.dynamic
    assert cfg.output.bits is None and cfg.output.bound is None
    assert cfg.weight_noise.kind is WeightNoiseKind.NONE and cfg.output_noise.std == 0
    assert cfg.clip.kind is ClipKind.NONE
    assert w4a8_qat_config(group_size=64).weight_quant.group_size == 64
    assert afm.AnalogConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("training", [False, True])
def test_w4a8_forward_is_fake_quant_linear_with_quantized_inputs(training):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    layer = afm.AnalogLinear.from_linear(lin, w4a8_qat_config()).train(training)
    with torch.no_grad():
        layer.input_range.fill_(1.5)
    x = torch.randn(4, 7, 128)
    y = layer(x)
    ref = nn.functional.linear(
        quantize_input(x, torch.tensor(1.5), 8), fake_quantize_weight(lin.weight, 4), lin.bias
    )
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    # Differs from the unquantized layer, and no noise: repeated forwards are identical.
    assert not torch.allclose(y, lin(x), atol=1e-3)
    assert torch.equal(layer(x), y)


def test_w4a8_training_step_reaches_weights():
    model = tiny_model("llama").train()
    afm.convert(model, w4a8_qat_config())
    layers = afm.analog_layers(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (2, 16), generator=gen) for _ in range(2)]
    afm.calibrate_input_ranges_(model, batches, progress=False)
    ranges = {n: m.input_range.detach().clone() for n, m in layers.items()}
    assert all(torch.all(r != 3.0) for r in ranges.values())  # calibrated from data

    # STE: the gradient reaching W equals the gradient w.r.t. the quantized weight.
    probe = model.model.layers[1].mlp.down_proj
    seen = {}

    def keep_input(module, args, output):  # returns None: the output is unchanged
        seen.setdefault("x", args[0].detach())

    probe.register_forward_hook(keep_input)
    x = batches[0]
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for name, layer in layers.items():
        assert layer.weight.grad is not None, name
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0, name
        assert layer.input_range.grad is not None, name

    # Recompute the probe's output gradient with a hook-free reference of the same math.
    xin = seen["x"]
    wq = fake_quantize_weight(probe.weight.detach(), 4).requires_grad_(True)
    xq = quantize_input(xin, probe.input_range.detach()[0], 8)
    y_ref = nn.functional.linear(xq, wq, probe.bias)
    g_out = torch.randn_like(y_ref)
    (gw_ref,) = torch.autograd.grad((y_ref * g_out).sum(), wq)
    w_probe = probe.weight.detach().clone().requires_grad_(True)
    y = afm.reference.analog_linear(
        xin, w_probe, probe.bias, probe.input_range, probe.analog_config, training=True
    )
    assert torch.allclose(y, y_ref, atol=1e-5)
    (gw,) = torch.autograd.grad((y * g_out).sum(), w_probe)
    assert torch.allclose(gw, gw_ref, atol=1e-5, rtol=1e-4)

    # One optimizer step changes the weights and the ranges.
    w_before = {n: m.weight.detach().clone() for n, m in layers.items()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(m.weight, w_before[n]) for n, m in layers.items())
    assert any(not torch.equal(m.input_range, ranges[n]) for n, m in layers.items())
