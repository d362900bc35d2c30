"""afm-lora's TRL modes (SFTTrainer, GRPOTrainer) on tiny random analog Llamas: only the
adapter trains, the analog base stays bitwise frozen, the chip's noise is on in the
loss and in the rollouts, afm's layer survives TRL, adapters save and load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")

import afm  # noqa: E402
import afm.lora as L  # noqa: E402
from afm.analog.layers import AnalogLinear  # noqa: E402
from afm.lora.grpo import grpo_adapter  # noqa: E402
from afm.lora.instruct_data import to_dataset  # noqa: E402
from afm.lora.rewards import load_reward  # noqa: E402
from afm.lora.sft import sft_adapter  # noqa: E402
from afm.lora.train import completion_loss  # noqa: E402
from afm.lora.trl_common import seeded_noise  # noqa: E402
from afm.presets import get_preset  # noqa: E402
from afm.toyworld import arith_problems  # noqa: E402

BODY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def analog(toy_llama):
    """``(model, tokenizer)``: a tiny random Llama on the tiny demos' chip."""

    def make(preset: str = "tiny-stress", **convert_kwargs):
        model, tok = toy_llama(max_positions=96)
        afm.convert(model, get_preset(preset), **convert_kwargs)
        for layer in afm.analog_layers(model).values():
            layer.input_range.data.fill_(2.5)
        return model.eval(), tok

    return make


def arith_rows(n: int = 8, mode: str = "sft") -> list[dict]:
    probs = arith_problems("train", n, digits=(2,))
    if mode == "sft":
        return [{"prompt": p.prompt, "completion": p.solution} for p in probs]
    return [{"prompt": p.prompt, "answer": str(p.answer)} for p in probs]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_adapter_changed(model, before: dict[str, torch.Tensor], adapter="default"):
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "training changed nothing"
    assert all(f"lora_B.{adapter}." in n or f"lora_A.{adapter}." in n for n in changed), changed
    base = [n for n in before if "lora_" not in n]
    assert any(n.endswith("input_range") for n in base)
    for n in base:  # the analog base bitwise: weights, biases, input ranges, embeddings
        assert torch.equal(before[n], dict(model.named_parameters())[n].detach()), n


def length_reward(completions, **_):
    """Varies between completions of one prompt: GRPO gets non-zero advantages."""
    return [float(len(c)) / 10 for c in completions]


# --------------------------------------------------------------------------- SFT


def test_sft_trains_only_the_adapter_on_the_noisy_chip(analog):
    model, tok = analog()
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    before = snapshot(pm)
    res = sft_adapter(pm, tok, to_dataset(arith_rows()), steps=2, batch_size=4, progress=False)
    assert_only_adapter_changed(pm, before)
    # every forward of the trainer ran the analog layers in training mode (noise on)
    assert res.forwards["train/grad"] > 0
    assert res.forwards["eval/grad"] == res.forwards["eval/no_grad"] == 0
    assert len(L.analog_lora_layers(pm)) == len(afm.analog_layers(pm))
    assert not pm.training
    with pytest.raises(L.AnalogMergeError):
        pm.merge_and_unload()
    assert [s for s, _ in res.series("loss")] == [1, 2]


@pytest.mark.parametrize("analog_head", [False, True])
def test_sft_prompt_completion_loss_is_on_the_completion_only(analog, analog_head):
    """noise=False, one batch of all rows, lr 0 in the first step (warm-up): TRL's
    first logged loss is the completion-only NLL that afm computes itself — through
    the analog output head too (TRL's fused head would read lm_head.weight digitally)."""
    model, tok = analog(convert_lm_head=analog_head)
    assert isinstance(model.lm_head, AnalogLinear) == analog_head
    pm = L.attach_lora(model, r=4, alpha=8, seed=0, targets=BODY, init_lora_weights=False)
    rows = arith_rows(4)
    expected = completion_loss(pm, tok, [(r["prompt"], r["completion"]) for r in rows])
    res = sft_adapter(pm, tok, to_dataset(rows), steps=2, batch_size=4, noise=False, progress=False)
    assert res.forwards["train/grad"] == 0 and res.forwards["eval/grad"] > 0
    assert res.log[0]["learning_rate"] == 0.0
    assert res.log[0]["loss"] == pytest.approx(expected, rel=1e-4)
    full = completion_loss(pm, tok, [("", r["prompt"] + r["completion"]) for r in rows])
    assert abs(full - expected) > 1e-3  # a loss on the prompt too would differ
    if analog_head:  # the digital projection TRL would use gives another loss
        with torch.no_grad():
            lm = model.lm_head
            digital = torch.nn.Linear(lm.in_features, lm.out_features, bias=False)
            digital.weight.copy_(lm.weight)
            model.lm_head = digital
        assert (
            abs(completion_loss(pm, tok, [(r["prompt"], r["completion"]) for r in rows]) - expected)
            > 1e-4
        )


def test_grpo_with_an_analog_head(analog):
    model, tok = analog(convert_lm_head=True)
    pm = L.attach_lora(model, r=4, alpha=8, seed=0, targets=BODY)
    before = snapshot(pm)
    res = grpo_adapter(
        pm,
        tok,
        to_dataset(arith_rows(4, "grpo")),
        [length_reward],
        steps=2,
        batch_size=4,
        num_generations=2,
        max_completion_length=8,
        lr=5e-3,
        progress=False,
    )
    assert_only_adapter_changed(pm, before)
    assert res.forwards["train/no_grad"] > 0 and res.forwards["eval/no_grad"] == 0


def test_sft_conversational_data_with_a_chat_template(analog):
    model, tok = analog()
    tok.chat_template = CHAT_TEMPLATE
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in arith_rows(4)
    ]
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    before = snapshot(pm)
    sft_adapter(pm, tok, to_dataset(rows), steps=2, batch_size=2, progress=False)
    assert_only_adapter_changed(pm, before)


def test_trl_own_peft_config_path_keeps_the_afm_layer(analog, tmp_path):
    """TRL building the peft model from afm's registered config gets AnalogLoraLinear."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tok = analog()
    config = L.register_analog_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    args = SFTConfig(str(tmp_path), max_steps=1, report_to="none", bf16=False, use_cpu=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(arith_rows(4)),
        processing_class=tok,
        peft_config=config,
    )
    layers = L.analog_lora_layers(trainer.model)
    assert len(layers) == 2 and all(n.endswith("q_proj") for n in layers)
    with pytest.raises(L.AnalogMergeError):
        trainer.model.merge_and_unload()


def test_refuses_what_would_not_be_hardware_aware(analog, toy_llama):
    model, tok = analog()
    pm = L.attach_lora(model, r=4, seed=0)
    from afm.lora.trl_common import PINNED

    key = next(k for k in PINNED if k.endswith("_checkpointing"))
    with pytest.raises(ValueError, match=key):
        sft_adapter(pm, tok, to_dataset(arith_rows(4)), steps=1, trl_args={key: True})
    plain, _ = toy_llama()
    with pytest.raises(ValueError, match="PeftModel"):
        sft_adapter(plain, tok, to_dataset(arith_rows(4)), steps=1)


# --------------------------------------------------------------------------- GRPO


def test_grpo_trains_only_the_adapter_with_rollouts_on_the_noisy_chip(analog):
    model, tok = analog()
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    before = snapshot(pm)
    res = grpo_adapter(
        pm,
        tok,
        to_dataset(arith_rows(8, "grpo")),
        [length_reward, load_reward("exact-match")],
        steps=2,
        batch_size=8,
        num_generations=4,
        max_completion_length=12,
        lr=5e-3,
        progress=False,
    )
    assert_only_adapter_changed(pm, before)
    # the rollouts (no-grad generation) and the loss both ran on the chip in training mode
    assert res.forwards["train/no_grad"] >= 2 * 12 * len(afm.analog_layers(pm))
    assert res.forwards["train/grad"] > 0
    assert res.forwards["eval/grad"] == res.forwards["eval/no_grad"] == 0
    assert [s for s, _ in res.series("reward")] == [1, 2]
    assert len(L.analog_lora_layers(pm)) == len(afm.analog_layers(pm))


def test_rollouts_with_one_sampling_seed_differ_only_through_the_analog_noise(analog):
    """Generation as GRPO runs it (training mode, sampling): the same sampling seed and
    the same noise seeds give the same rollouts; other noise seeds give others."""
    model, tok = analog("tiny-stress")  # no noise in eval mode (ahwa-lora keeps some)
    pm = L.attach_lora(model, r=4, seed=0, targets=BODY)
    enc = tok(
        [p.prompt for p in arith_problems("train", 4, digits=(2,))],
        return_tensors="pt",
        padding=True,
    )

    def rollout(noise_seed: int, train: bool = True) -> torch.Tensor:
        pm.train(train)
        with seeded_noise(pm, noise_seed, "test"), torch.no_grad():
            torch.manual_seed(0)
            out = pm.generate(
                **enc,
                do_sample=True,
                max_new_tokens=12,
                min_new_tokens=12,
                pad_token_id=tok.pad_token_id,
            )
        pm.eval()
        return out

    a, b, c = rollout(1), rollout(1), rollout(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(rollout(1, train=False), rollout(2, train=False))  # no noise: same


def test_grpo_on_a_loaded_adapter_with_kl_saves_a_loadable_adapter(analog, tmp_path):
    model, tok = analog()
    pm = L.attach_lora(model, r=4, alpha=8, seed=0)
    pm.save_pretrained(tmp_path / "init")
    model2, _ = analog()
    pm2 = L.load_adapter(model2, tmp_path / "init", is_trainable=True)
    before = snapshot(pm2)
    grpo_adapter(
        pm2,
        tok,
        to_dataset(arith_rows(4, "grpo")),
        [length_reward],
        steps=2,
        batch_size=4,
        num_generations=2,
        max_completion_length=8,
        beta=0.1,
        lr=5e-3,
        progress=False,
    )
    assert list(pm2.peft_config) == ["default"]  # TRL's frozen "ref" copy is gone again
    assert_only_adapter_changed(pm2, before)
    pm2.save_pretrained(tmp_path / "rl")
    model3, _ = analog()
    pm3 = L.load_adapter(model3, tmp_path / "rl")
    assert len(L.analog_lora_layers(pm3)) == len(afm.analog_layers(pm3))
    got = dict(pm3.named_parameters())
    for n, p in pm2.named_parameters():
        assert torch.equal(got[n], p), n


def test_grpo_argument_errors(analog):
    model, tok = analog()
    pm = L.attach_lora(model, r=4, seed=0, adapter_name="rl")
    ds = to_dataset(arith_rows(4, "grpo"))
    with pytest.raises(ValueError, match="multiple"):
        grpo_adapter(pm, tok, ds, [length_reward], batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="named 'default'"):
        grpo_adapter(pm, tok, ds, [length_reward], batch_size=4, num_generations=2, beta=0.1)
    with pytest.raises(ValueError, match="at least one reward"):
        grpo_adapter(pm, tok, ds, [], batch_size=4, num_generations=2)
    assert not any(isinstance(m, AnalogLinear) and m.training for m in pm.modules())


def test_sft_is_deterministic_given_the_seed(analog):
    """TRL's data order and sampling follow ``seed``, the analog noise its per-layer
    generators: the same seed trains the same adapter, another seed another."""

    def train(seed: int) -> dict[str, torch.Tensor]:
        model, tok = analog()
        pm = L.attach_lora(model, r=4, alpha=8, seed=0)
        sft_adapter(
            pm, tok, to_dataset(arith_rows()), steps=3, batch_size=2, seed=seed, progress=False
        )
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
