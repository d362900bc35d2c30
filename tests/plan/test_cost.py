"""afm-plan cost: chip descriptions, model matrices on the meta device, the cost model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from afm.cli import plan as plan_cli
from afm.plan.chips import CHIPS, ChipSpec, get_chip, load_chip
from afm.plan.cost import chip_cost
from afm.plan.shapes import meta_model, model_matrices


def _meta(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _hand_llama():
    # 1 block, hidden 320 (2 row tiles of 256), FFN 640 (3 tiles), 4 heads of 80, 2 KV heads
    return _meta(
        transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=320,
            intermediate_size=640,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=80,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


HAND_CHIP = ChipSpec(
    "hand",
    crossbar_rows=256,
    crossbar_cols=256,
    cores=8,
    mvm_time_ns=100.0,
    mvm_energy_nj=25.6,  # 100 pJ per conversion
    digital_ops_per_s=1e9,
    digital_energy_pj=2.0,
)


def test_a_hand_computed_llama_block():
    model = _hand_llama()
    r = chip_cost(model, HAND_CHIP, context=16)
    # crossbars ceil(K/256)*ceil(N/256): q 2*2, k 2*1, v 2*1, o 2*2, gate 2*3, up 2*3, down 3*2
    assert r.crossbars == 4 + 2 + 2 + 4 + 6 + 6 + 6 == 30
    assert r.mvms == 30
    # ADC: row tiles * N; DAC: K * column tiles
    assert r.adc_conversions == 2 * 320 + 2 * 160 * 2 + 2 * 320 + 2 * 640 * 2 + 3 * 320 == 5440
    assert r.dac_conversions == 320 * 2 + 320 * 2 + 320 * 2 + 320 * 3 * 2 + 640 * 2 == 5120
    assert r.analog_macs == 320 * (320 + 160 + 160 + 320 + 640 + 640) + 640 * 320 == 921_600
    assert r.utilisation == pytest.approx(921_600 / (30 * 256 * 256))
    assert not r.fits and r.chips_needed == math.ceil(30 / 8) == 4 and r.cores_needed == 30
    assert r.digital_params == 100 * 320  # the output head stays digital
    ops = r.digital_ops
    assert ops["output head"] == 2 * 100 * 320
    assert ops["tile outputs"] == 2 * 5440
    # QK^T and AV: 2 MACs per head dim per cached token; softmax 5 ops per score; rotary
    assert ops["attention"] == 2 * 2 * 4 * 80 * 16 + 5 * 4 * 16 + 3 * (4 + 2) * 80
    assert ops["norms"] == 4 * 3 * 320  # 3 RMSNorms
    assert ops["activations"] == 5 * 640
    assert ops["residual adds"] == 2 * 320
    total = 64_000 + 10_880 + 22_240 + 3_840 + 3_200 + 640
    assert r.digital_ops_total == total
    d = r.to_dict()
    # 32 parallel cores on 4 chips: each of the 7 matrices takes one 100 ns MVM time
    assert d["latency_ns"] == {"analog": 700.0, "digital": total, "total": 700.0 + total}
    assert d["energy_nj"]["analog"] == pytest.approx(5440 * 0.1)
    assert d["energy_nj"]["digital"] == pytest.approx(total * 2e-3)
    assert r.digital_share == pytest.approx(total / (total + 2 * 921_600))
    json.dumps(d)  # JSON-ready


def test_placement_layers_and_patterns_decide_analog_or_digital():
    model = _hand_llama()
    down = "model.layers.0.mlp.down_proj"
    everything = [m.name for m in model_matrices(model) if m.kind == "linear"]
    r = chip_cost(model, HAND_CHIP, analog=[n for n in everything if n != down], context=16)
    assert r.crossbars == 24 and r.analog_macs == 921_600 - 640 * 320
    assert r.digital_ops["digital layers"] == 2 * 640 * 320
    r2 = chip_cost(model, HAND_CHIP, digital=["mlp"], context=16)
    assert r2.crossbars == 12  # attention only
    r3 = chip_cost(model, HAND_CHIP, analog_head=True, context=16)
    assert r3.crossbars == 30 + 2 * 1 and r3.digital_ops["output head"] == 0
    with pytest.raises(ValueError, match="did you mean model.layers.0.mlp.down_proj"):
        chip_cost(model, HAND_CHIP, analog=["model.layers.0.mlp.down_prj"])
    with pytest.raises(ValueError, match="context"):
        chip_cost(model, HAND_CHIP, context=0)


def test_lora_overhead_matches_the_ahwa_lora_cross_check():
    # a BERT-base-sized 768x768 layer with rank-16 adapters: r(K+N)/(KN) = 4.2 %
    model = _meta(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=768,
            intermediate_size=768,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=32,
        )
    )
    r = chip_cost(model, get_chip("hermes"), lora_rank=16, lora_targets=["q_proj"], context=8)
    row = next(m for m in r.matrices if m["name"].endswith("q_proj"))
    assert row["lora_macs"] / row["analog_macs"] == pytest.approx(16 * 1536 / 768**2)
    assert 0.04 < row["lora_macs"] / row["analog_macs"] < 0.043
    assert r.digital_ops["lora adapters"] == 2 * row["lora_macs"] + 768
    assert sum("lora_macs" in m for m in r.matrices) == 1


def test_moe_experts_count_all_for_tiles_and_the_active_ones_per_token():
    config = transformers.MixtralConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    model = _meta(config)
    mats = {m.name: m for m in model_matrices(model)}
    up = mats["model.layers.0.mlp.experts.gate_up_proj"]
    assert (up.kind, up.in_features, up.out_features, up.copies, up.active) == (
        "experts", 64, 256, 4, 2,
    )  # fmt: skip
    down = mats["model.layers.0.mlp.experts.down_proj"]
    assert (down.in_features, down.out_features) == (128, 64)
    assert mats["model.layers.0.mlp.gate.weight"].kind == "router"
    chip = ChipSpec("small", crossbar_rows=64, crossbar_cols=64, cores=1000)
    r = chip_cost(model, chip, context=8)
    rows = {m["name"]: m for m in r.matrices}
    assert rows[up.name]["crossbars"] == 1 * 4 * 4 and rows[up.name]["mvms"] == 4 * 2
    assert rows[down.name]["crossbars"] == 2 * 1 * 4 and rows[down.name]["mvms"] == 2 * 2
    assert rows[up.name]["analog_macs"] == 64 * 256 * 2
    assert r.digital_ops["routers"] == 2 * 4 * 64
    assert r.digital_ops["activations"] == 5 * 128 * 2  # the active experts only
    # an experts module that stores [E, in, out] says so
    experts = model.get_submodule("model.layers.0.mlp.experts")
    experts.is_transposed = True
    flipped = {m.name: m for m in model_matrices(model)}[up.name]
    assert (flipped.in_features, flipped.out_features) == (256, 64)
    holder = torch.nn.Module()  # experts without a config saying how many are active
    holder.experts = experts
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        model_matrices(holder)


def test_bundled_configs_build_on_meta_with_the_published_sizes():
    phi, source = meta_model("phi-3-mini")
    assert "microsoft/Phi-3-mini-4k-instruct" in source
    assert sum(p.numel() for p in phi.parameters()) == 3_821_079_552
    assert all(p.device.type == "meta" for p in phi.parameters())
    llama, _ = meta_model("llama-3.2-1b")
    assert sum(p.numel() for p in llama.parameters()) == 1_235_814_400
    mixtral, _ = meta_model("mixtral-8x7b")
    active = sum(m.macs_per_token for m in model_matrices(mixtral) if m.kind != "head")
    assert sum(p.numel() for p in mixtral.parameters()) == 46_702_792_704
    assert 12.7e9 < active + 32000 * 4096 < 12.9e9  # ~12.9 B active parameters per token


def test_the_tiny_model_fits_one_hermes_chip():
    model, _ = meta_model("tiny")
    r = chip_cost(model, get_chip("hermes"), context=256)
    # 4 blocks x (q, k, v, o: 1 crossbar each; gate, up: 1x3; down: 3x1)
    assert r.crossbars == 4 * (4 + 3 + 3 + 3) == 52 and r.fits and r.chips_needed == 1
    assert r.utilisation == 1.0
    assert r.analog_time_ns == 4 * 7 * 133.0


def test_chip_yaml_overrides_and_refuses_unknown_keys(tmp_path):
    good = tmp_path / "chip.yaml"
    good.write_text("base: 3d-sim\ncores: 10\ndigital_ops_per_s: 1e13\n")
    chip = load_chip(good)
    assert chip.cores == 10 and chip.crossbar_rows == 512 and chip.digital_ops_per_s == 1e13
    assert "chip.yaml" in chip.source
    bad = tmp_path / "bad.yaml"
    bad.write_text("corez: 10\n")
    with pytest.raises(ValueError, match="unknown keys \\['corez'\\]"):
        load_chip(bad)
    bad.write_text("cores: 0\n")
    with pytest.raises(ValueError, match="ChipSpec.cores=0 is invalid"):
        load_chip(bad)
    with pytest.raises(ValueError, match="unknown chip"):
        get_chip("nope")
    assert set(CHIPS) >= {"hermes", "hermes-4phase", "3d-sim"}


def _one_line(capsys, rc):
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("afm-plan: error:"), err
    return err[0]


def test_cost_cli_writes_reports_and_bad_input_is_one_line(tmp_path, capsys):
    args = ["cost", "--model", "tiny", "--model", "llama-3.2-1b", "--out", str(tmp_path)]
    rc = plan_cli.main(args)
    assert rc == 0
    out = capsys.readouterr().out
    assert "| tiny | hermes |" in out and "| llama-3.2-1b | hermes |" in out
    data = json.loads((tmp_path / "cost.json").read_text())
    assert [r["model"] for r in data["reports"]] == ["tiny", "llama-3.2-1b"]
    assert data["reports"][0]["fits"] is True and data["reports"][1]["fits"] is False
    assert "no-such-chip" in _one_line(capsys, plan_cli.main(["cost", "--chip", "no-such-chip"]))
    line = _one_line(capsys, plan_cli.main(["cost", "--model", "tiny", "--context", "999"]))
    assert "exceeds the model's 256 positions" in line
    missing = tmp_path / "nope.json"
    assert "does not exist" in _one_line(
        capsys, plan_cli.main(["cost", "--placement", str(missing)])
    )
