"""AHWA-LoRA on peft (afm.lora): fast tests on tiny random Llamas."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import afm  # noqa: E402
import afm.lora as L  # noqa: E402
from afm.analog.layers import AnalogLinear  # noqa: E402
from afm.lora.train import collate_pairs, encode_pairs  # noqa: E402
from afm.presets import get_preset  # noqa: E402
from afm.seeds import derive_seed  # noqa: E402

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402  isort: skip

VOCAB = 61
TARGET_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a busy shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def quiet_eval(preset: str) -> afm.AnalogConfig:
    """The preset's chip without output noise at eval: these tests compare eval forwards
    bitwise (ahwa-lora keeps it on at eval like aihwkit: tests/test_chips.py)."""
    cfg = get_preset(preset)
    return cfg.replace(output_noise=dataclasses.replace(cfg.output_noise, keep_at_eval=False))


def analog_llama(seed: int = 0, preset: str = "ahwa-lora", **convert_kwargs) -> LlamaForCausalLM:
    model = tiny_llama(seed)
    afm.convert(model, quiet_eval(preset), **convert_kwargs)
    for layer in afm.analog_layers(model).values():  # something other than the init value
        layer.input_range.data.fill_(2.5)
    return model


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def randomize_lora_b_(model: nn.Module, seed: int = 3) -> None:
    """lora_B starts at zero (adapter = identity); make the adapter do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the model (analog weights, biases, input ranges, ...)."""
    return {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if "lora_" not in n and "modules_to_save" not in n
    }


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class ToyTokenizer:
    """Enough of a HF tokenizer for afm.lora's data path: one token per character."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2

    def __call__(self, texts, add_special_tokens=True, **_):
        out = []
        for t in texts:
            seq = [3 + (ord(c) % (VOCAB - 3)) for c in t]
            out.append(([self.bos_token_id] if add_special_tokens else []) + seq)

        class Enc:
            input_ids = out

        return Enc()


EXAMPLES = [(f"Q: {a}+{b}=? A: ", f"{a + b}") for a in range(4) for b in range(4)]


# --------------------------------------------------------------------------- wrapping


def test_every_targeted_analog_layer_gets_afm_lora_layer():
    model = analog_llama()
    analog = set(afm.analog_layers(model))
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    lora = L.analog_lora_layers(pm)
    assert len(analog) == 14
    assert {n.removeprefix("base_model.model.") for n in lora} == analog
    for layer in lora.values():
        assert isinstance(layer, L.AnalogLoraLinear)
        assert isinstance(layer.get_base_layer(), AnalogLinear)
        assert type(layer.lora_A["default"]) is nn.Linear  # digital adapter
    # the lm head stays digital and untouched
    assert type(pm.get_base_model().lm_head) is nn.Linear


def test_targets_select_a_subset():
    pm = L.attach_lora(analog_llama(), r=2, targets=["q_proj", "v_proj"])
    names = {n.rsplit(".", 1)[-1] for n in L.analog_lora_layers(pm)}
    assert names == {"q_proj", "v_proj"}
    assert len(L.analog_lora_layers(pm)) == 4


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank"):
        L.attach_lora(analog_llama(), r=0)
    with pytest.raises(ValueError, match="alpha"):
        L.attach_lora(analog_llama(), alpha=-1)
    with pytest.raises(ValueError, match="no AnalogLinear"):
        L.attach_lora(tiny_llama())
    with pytest.raises(ValueError, match="analog"):
        L.attach_lora(analog_llama(), modules_to_save=["mlp"])
    with pytest.raises(ValueError, match="dora"):
        L.attach_lora(analog_llama(), use_dora=True)


def test_peft_version_check():
    L.check_peft_version("0.21.2")
    L.check_peft_version("0.15.0")
    for bad in ("0.14.9", "0.23.0", "1.0.0"):
        with pytest.raises(ImportError, match=r"peft>=0\.15,<0\.23"):
            L.check_peft_version(bad)


def test_import_afm_stays_light():
    code = "import sys, afm; assert 'peft' not in sys.modules and 'afm.lora' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- trainability


def test_only_adapter_params_are_trainable():
    pm = L.attach_lora(analog_llama(), r=4)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for layer in afm.analog_layers(pm).values():
        assert not layer.weight.requires_grad
        assert not layer.input_range.requires_grad
    rep = L.trainable_report(pm)
    assert rep.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert rep.total == sum(p.numel() for p in pm.parameters())
    assert rep.pct == pytest.approx(100 * rep.trainable / rep.total)
    assert f"{rep.trainable:,}" in str(rep) and "%" in str(rep)
    trainable_, total, pct = rep  # unpacks as a tuple
    assert (trainable_, total, pct) == (rep.trainable, rep.total, rep.pct)


def test_modules_to_save_are_digital_and_trainable():
    pm = L.attach_lora(analog_llama(), r=2, modules_to_save=["norm"])
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any(
        "modules_to_save" in n and n.endswith("norm.modules_to_save.default.weight")
        for n in trainable
    )
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    # and it is saved with the adapter
    from peft.utils import get_peft_model_state_dict

    keys = get_peft_model_state_dict(pm).keys()
    assert any("norm" in k and "lora_" not in k for k in keys)


def test_gradients_reach_adapters_under_noise():
    pm = L.attach_lora(analog_llama(), r=4, seed=0)
    randomize_lora_b_(pm)
    pm.train()
    x = ids()
    with torch.no_grad():
        y1, y2 = pm(input_ids=x).logits, pm(input_ids=x).logits
    assert not torch.equal(y1, y2), "hardware noise must be active in train mode"
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=x).logits, pm(input_ids=x).logits)


# --------------------------------------------------------------------------- noise-free adapter


def _adapter_math(layer: L.AnalogLoraLinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (x @ a.t()) @ b.t() * layer.scaling["default"]


def test_adapter_path_is_plain_lora_math_on_an_ideal_analog_path():
    model = analog_llama(preset="ideal")
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    randomize_lora_b_(pm)
    layer = next(iter(L.analog_lora_layers(pm).values()))
    base = layer.get_base_layer()
    x = torch.randn(3, 5, base.in_features) * 10
    pm.train()
    with torch.no_grad():
        want = nn.functional.linear(x, base.weight, base.bias) + _adapter_math(layer, x)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_adapter_path_is_noise_free_and_sees_the_unclipped_input():
    """Under ahwa-lora noise in train mode, adapter-on minus adapter-off (same noise
    seed) is exactly the digital LoRA term of the unclipped input."""
    pm = L.attach_lora(analog_llama(), r=4, alpha=8, seed=0)
    randomize_lora_b_(pm)
    layer = next(iter(L.analog_lora_layers(pm).values()))
    base = layer.get_base_layer()
    x = torch.randn(3, 5, base.in_features) * 10  # far outside input_range = 2.5
    pm.train()
    outs = []
    with torch.no_grad():
        for disable in (False, True):
            base.noise_generator = torch.Generator().manual_seed(7)
            if disable:
                with pm.disable_adapter():
                    outs.append(layer(x))
            else:
                outs.append(layer(x))
        base.noise_generator = torch.Generator().manual_seed(8)
        other_noise = base(x)
    base.noise_generator = None
    assert not torch.equal(outs[1], other_noise), "the analog path must be noisy"
    torch.testing.assert_close(outs[0] - outs[1], _adapter_math(layer, x), rtol=1e-4, atol=1e-4)
    clipped = x.clamp(-2.5, 2.5)
    assert not torch.allclose(_adapter_math(layer, clipped), _adapter_math(layer, x))


# --------------------------------------------------------------------------- merging


def test_merge_is_refused_and_unload_disable_work():
    model = analog_llama()
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    pm = L.attach_lora(model, r=4, seed=0)
    randomize_lora_b_(pm)
    before = base_state(pm)
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
    assert not torch.allclose(adapted, ref)
    for call in (pm.merge_and_unload, pm.merge_adapter, pm.base_model.merge_and_unload):
        with pytest.raises(L.AnalogMergeError, match="re-program"):
            call()
    layer = next(iter(L.analog_lora_layers(pm).values()))
    with pytest.raises(L.AnalogMergeError):
        layer.merge()
    assert_bitwise_equal(before, base_state(pm))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=x).logits, adapted)
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=x).logits, ref)
    unloaded = pm.unload()
    assert not L.analog_lora_layers(unloaded)
    assert len(afm.analog_layers(unloaded)) == 14
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=x).logits, ref)


def test_mixed_targets_refused_before_anything_is_merged():
    model = analog_llama(exclude=["o_proj"])  # o_proj stays a plain digital Linear
    assert not isinstance(model.model.layers[0].self_attn.o_proj, AnalogLinear)
    pm = L.attach_lora(model, r=4, targets=["q_proj", "o_proj"], seed=0)
    randomize_lora_b_(pm)
    x = ids()
    plain = [
        m
        for m in pm.modules()
        if type(m).__name__ == "Linear"
        and hasattr(m, "merged")
        and not isinstance(m, L.AnalogLoraLinear)
    ]
    assert len(plain) == 2  # the stock peft layers on the plain o_proj
    before = base_state(pm)
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
    for call in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(L.AnalogMergeError, match="nothing was merged"):
            call()
    assert not any(m.merged for m in plain)
    assert_bitwise_equal(before, base_state(pm))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=x).logits, adapted)


# --------------------------------------------------------------------------- saving / loading


def test_save_load_round_trip(tmp_path: Path):
    model = analog_llama()
    base_dir = tmp_path / "base"
    afm.attach_quantization_config(model)
    model.save_pretrained(base_dir)
    pm = L.attach_lora(model, r=4, seed=0)
    randomize_lora_b_(pm)
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "adapter")
    # adapter only: no base weights, no input ranges
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert not any("input_range" in k or "base_layer" in k for k in saved)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert len(afm.analog_layers(fresh)) == 14
    loaded = L.load_adapter(fresh, tmp_path / "adapter")
    lora = L.analog_lora_layers(loaded)
    assert len(lora) == 14, "the afm layer must be re-registered on load"
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=0, atol=0)
    with pytest.raises(L.AnalogMergeError):
        loaded.merge_and_unload()


def test_plain_peft_load_would_lose_the_guard(tmp_path: Path):
    """Why load_adapter exists: peft alone brings back the stock layer."""
    from peft import PeftModel

    pm = L.attach_lora(analog_llama(), r=2, seed=0)
    pm.save_pretrained(tmp_path)
    stock = PeftModel.from_pretrained(analog_llama(), tmp_path)
    assert not L.analog_lora_layers(stock)
    ours = L.load_adapter(analog_llama(), tmp_path)
    assert len(L.analog_lora_layers(ours)) == 14


def test_adapter_state_dict_has_no_base_weights():
    from peft.utils import get_peft_model_state_dict

    pm = L.attach_lora(analog_llama(), r=2)
    sd = get_peft_model_state_dict(pm)
    assert sd
    assert all("lora_" in k for k in sd)
    assert not any("input_range" in k or "base_layer" in k for k in sd)
    n_adapter = sum(t.numel() for t in sd.values())
    assert n_adapter == L.trainable_report(pm).trainable


# --------------------------------------------------------------------------- training


def test_completion_only_labels():
    tok = ToyTokenizer()
    enc = encode_pairs(tok, [("ab", "cd"), ("x", "yz1")], append_eos=True, max_length=None)
    batch = collate_pairs(enc, [0, 1], tok.pad_token_id)
    # row 0: BOS a b | c d EOS ; row 1: BOS x | y z 1 EOS
    assert batch["labels"][0, :3].tolist() == [-100] * 3
    assert batch["labels"][0, 3:6].tolist() == batch["input_ids"][0, 3:6].tolist()
    assert batch["labels"][0, 5].item() == tok.eos_token_id
    assert batch["labels"][1, :2].tolist() == [-100] * 2
    assert batch["labels"][1, 2:6].tolist() == batch["input_ids"][1, 2:6].tolist()
    assert batch["attention_mask"].sum().item() == 6 + 6


def test_train_adapter_base_unchanged_and_deterministic():
    tok = ToyTokenizer()
    runs = []
    for _ in range(2):
        pm = L.attach_lora(analog_llama(), r=4, seed=0)
        before = base_state(pm)
        res = L.train_adapter(
            pm, tok, EXAMPLES, steps=6, lr=1e-2, batch_size=4, seed=5, progress=False
        )
        assert_bitwise_equal(before, base_state(pm))
        assert not pm.training
        runs.append(
            (
                res.losses,
                {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad},
            )
        )
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][0]) == 6
    for n, p in runs[0][1].items():
        assert torch.equal(p, runs[1][1][n]), n
    # the adapter learned something: lora_B left zero
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in runs[0][1].items())


def test_train_adapter_noise_flag_changes_training():
    tok = ToyTokenizer()
    losses = {}
    for noise in (True, False):
        pm = L.attach_lora(analog_llama(), r=4, seed=0)
        losses[noise] = L.train_adapter(
            pm, tok, EXAMPLES, steps=3, lr=1e-2, batch_size=4, seed=5, noise=noise, progress=False
        ).losses
    assert losses[True] != losses[False]
    # without noise the first loss equals the eval-mode loss of the same batch
    pm = L.attach_lora(analog_llama(), r=4, seed=0)
    enc = encode_pairs(tok, EXAMPLES, append_eos=True, max_length=None)
    g = torch.Generator().manual_seed(derive_seed("afm-lora", 5, "data"))
    order = torch.randperm(len(enc.ids), generator=g).tolist()
    idx = [order.pop() for _ in range(4)]
    with torch.no_grad():
        eval_loss = pm(**collate_pairs(enc, idx, tok.pad_token_id)).loss.item()
    assert losses[False][0] == pytest.approx(eval_loss, rel=1e-5)


def test_two_adapters_swap_on_one_base():
    tok = ToyTokenizer()
    pm = L.attach_lora(analog_llama(), r=4, adapter_name="task_a", seed=0)
    before = base_state(pm)
    L.train_adapter(pm, tok, EXAMPLES[:8], steps=4, lr=1e-2, batch_size=4, progress=False)
    a_state = {n: p.detach().clone() for n, p in pm.named_parameters() if ".task_a." in n}
    pm = L.attach_lora(pm, r=4, adapter_name="task_b", seed=1)
    assert pm.active_adapter == "task_b"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".task_b." in n for n in trainable)
    L.train_adapter(pm, tok, EXAMPLES[8:], steps=4, lr=1e-2, batch_size=4, progress=False)
    for n, p in pm.named_parameters():  # training b left a alone
        if n in a_state:
            assert torch.equal(p, a_state[n]), n
    x = ids()
    with torch.no_grad():
        out_b = pm(input_ids=x).logits
        pm.set_adapter("task_a")
        out_a = pm(input_ids=x).logits
        pm.set_adapter("task_b")
        assert torch.equal(pm(input_ids=x).logits, out_b)
    assert not torch.allclose(out_a, out_b)
    assert_bitwise_equal(before, base_state(pm))
    assert len(L.analog_lora_layers(pm)) == 14


def test_load_second_adapter_onto_peft_model(tmp_path: Path):
    pm = L.attach_lora(analog_llama(), r=4, adapter_name="first", seed=0)
    randomize_lora_b_(pm, seed=1)
    pm.save_pretrained(tmp_path)  # writes tmp_path/first
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    other = L.attach_lora(analog_llama(), r=2, adapter_name="b", seed=3)
    other = L.load_adapter(other, tmp_path / "first", adapter_name="first")
    assert set(other.peft_config) == {"first", "b"}
    other.set_adapter("first")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=x).logits, want, rtol=0, atol=0)
    with pytest.raises(L.AnalogMergeError):
        other.merge_and_unload()


def test_completion_loss_drops_after_training():
    tok = ToyTokenizer()
    pm = L.attach_lora(analog_llama(), r=8, alpha=16, seed=0)
    before = L.completion_loss(pm, tok, EXAMPLES)
    L.train_adapter(pm, tok, EXAMPLES, steps=15, lr=2e-2, batch_size=8, progress=False)
    after = L.completion_loss(pm, tok, EXAMPLES)
    assert after < before


def test_adapter_config_file_is_plain_peft(tmp_path: Path):
    pm = L.attach_lora(analog_llama(), r=4, alpha=8)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == set(TARGET_LEAVES)


# --------------------------------------------------------------------------- tasks and CLI


def test_mul_task_format_and_splits():
    from afm.toyworld import lora_tasks as T

    p = T.MulProblem(47, 8)
    assert T.mul_text(p) == "Q: 47*8=? A: 7*8=56, 4*8+5=37. Answer: 376"
    assert p.prompt + p.solution == T.mul_text(p)
    assert T.mul_text(T.MulProblem(21, 3)).endswith("1*3=3, 2*3=6. Answer: 63")
    splits = {s: {q.key for q in T.mul_problems(s)} for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == 720
    assert not splits["train"] & splits["test"] and not splits["validation"] & splits["test"]
    assert T.mul_problems("test", 5) == T.mul_problems("test", 5)
    world = T.new_world()
    from afm import toyworld as tw

    assert len(world.entities) == T.NEW_WORLD_SIZE
    assert not set(world.entities) & set(tw.make_world().entities)
    with pytest.raises(ValueError, match="bundled tasks"):
        T.get_task("nope")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--base", "/nonexistent/dir", "--task", "mul"], "not found"),
        (["--base", "tiny", "--task", "no-such-task"], "unknown task"),
        (["--base", "tiny", "--task", "mul", "--r", "0"], "--r 0 is invalid"),
        (["--base", "tiny", "--task", "mul", "--steps", "0"], "--steps 0 is invalid"),
    ],
)
def test_cli_bad_input_one_clear_line(argv, message, tmp_path, capsys):
    from afm.cli.lora import main

    rc = main([*argv, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_end_to_end(tmp_path: Path, capsys):
    import itertools

    from afm import toyworld as tw
    from afm.cli.lora import main
    from afm.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(itertools.islice(tw.training_documents(), 200), vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "adapter"
    argv = ["--base", str(base), "--task", "mul", "--output", str(out), "--steps", "2"]
    argv += ["--eval-n", "2", "--noise", "gaussian", "--noise-seeds", "2", "--r", "2"]
    assert main([*argv, "--quiet", "--threads", "1", "--calib-steps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "trainable params" in stdout and "base+adapter" in stdout
    meta = json.loads((out / "afm_lora.json").read_text())
    assert meta["r"] == 2 and meta["train_noise"] is True
    assert [row["condition"] for row in meta["results"]][0] == "no noise"
    assert len(meta["results"][1]["base"]) == 2  # two chips
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    plain = LlamaForCausalLM.from_pretrained(base)
    afm.convert(plain, get_preset("ahwa-lora"), convert_lm_head=True)  # as afm-lora: head analog
    loaded = L.load_adapter(plain, out)
    # every analog layer but the head: peft then saves no embedding matrix either
    assert len(L.analog_lora_layers(loaded)) == 7
    assert not any("lm_head" in n for n in L.analog_lora_layers(loaded))
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert not any("embed" in k or "lm_head" in k for k in f.keys())


def test_default_targets_leave_an_analog_head_out(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, get_preset("ahwa-lora"), convert_lm_head=True)
    pm = L.attach_lora(model, r=2)
    adapted = L.analog_lora_layers(pm)
    assert adapted and not any(n.endswith("lm_head") for n in adapted)
    explicit = L.attach_lora(pm.get_base_model(), r=2, targets=["lm_head"], adapter_name="head")
    assert any(n.endswith("lm_head") for n in L.analog_lora_layers(explicit))
