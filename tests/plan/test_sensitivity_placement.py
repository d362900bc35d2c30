"""Layer sensitivity and mixed placement on a tiny random Llama with one fragile layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import afm
from afm.analog.hf import AfmQuantizationConfig
from afm.analog.noise import get_noise_model
from afm.plan.bench import Bench, calibrate, calibration_texts
from afm.plan.inputs import PlanInputError
from afm.plan.metrics import KLMetric, PerplexityMetric, make_metrics
from afm.plan.placement import Budget, search_placement
from afm.plan.sensitivity import SensitivityResult, layer_sensitivity
from afm.plan.units import block_of, make_units, resolve_units

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def setup(sensitive_dir, texts_file):
    model = AutoModelForCausalLM.from_pretrained(sensitive_dir).eval()
    tok = AutoTokenizer.from_pretrained(sensitive_dir)
    bench = Bench(model, tok, afm.get_preset("afm-paper"), calibration_texts(steps=2))
    selection, held_out = make_metrics(tokenizer=tok, fp_model=model, texts=texts_file, metric="kl")
    return model, tok, bench, selection, held_out


@pytest.fixture(scope="module")
def sweep(setup):
    _, _, bench, selection, _ = setup
    units = make_units(bench.layers)
    noise = get_noise_model("pcm")
    return units, layer_sensitivity(bench, units, selection, noise, SEEDS, progress=False)


def test_a_bench_state_is_exactly_afm_convert_with_that_placement(setup):
    model, tok, bench, _, _ = setup
    ids = tok(["Anna walked to the market"], return_tensors="pt").input_ids
    layers = list(bench.layers)[2:5]
    bench.set_state(layers)
    with torch.no_grad():
        got = bench.model(ids).logits
    fresh = afm.convert(copy.deepcopy(model), AfmQuantizationConfig("afm-paper", modules=layers))
    calibrate(fresh, tok, bench.calibration)
    with torch.no_grad():
        assert torch.equal(got, fresh.eval()(ids).logits)
    bench.set_state(())
    with torch.no_grad():
        assert torch.equal(bench.model(ids).logits, model(ids).logits)  # all digital: FP
    assert not afm.analog_layers(model)  # the caller's model is untouched


def test_a_bench_with_the_analog_head_matches_afm_convert_listing_the_head(setup, toy_llama):
    _, tok, _, _, _ = setup
    model, _ = toy_llama(max_positions=128, tie=True)  # the head shares the embedding
    emb = model.get_input_embeddings().weight.detach().clone()
    bench = Bench(model, tok, afm.get_preset("afm-paper"), calibration_texts(steps=1),
                  analog_head=True)  # fmt: skip
    assert "lm_head" in bench.layers
    ids = tok(["Anna walked to the market"], return_tensors="pt").input_ids
    for state in (["lm_head", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.up_proj"]):
        bench.set_state(state)
        with torch.no_grad():
            got = bench.model(ids).logits
        fresh = afm.convert(copy.deepcopy(model), AfmQuantizationConfig("afm-paper", modules=state))
        calibrate(fresh, tok, bench.calibration)
        assert ("lm_head" in afm.analog_layers(fresh)) == ("lm_head" in state)
        with torch.no_grad():
            assert torch.equal(got, fresh.eval()(ids).logits), state
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the caller's tie kept
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_sensitivity_ranks_the_fragile_layer_first_in_both_modes(sweep, sensitive_layer):
    units, result = sweep
    assert len(units) == 7 and result.meta["seeds"] == SEEDS
    assert result.ranked("analog_alone")[0].name == sensitive_layer
    assert result.ranked("digital_alone", per_param=True)[0].name == sensitive_layer
    top = result.ranked("digital_alone")[0]
    assert len(top.digital_alone) == len(top.analog_alone) == 3
    assert top.std("digital_alone") > 0  # three different programmed chips
    second = result.ranked("analog_alone")[1]
    assert top.mean("analog_alone") > 1.5 * second.mean("analog_alone")
    assert min(result.all_analog_loss) > top.mean("analog_alone") > 0
    again = SensitivityResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.ranked()[0].name == sensitive_layer and again.fp_score == result.fp_score


def test_placement_keeps_the_fragile_layer_digital(setup, sweep, sensitive_layer):
    _, _, bench, selection, _ = setup
    units, result = sweep
    all_analog = sum(result.all_analog_loss) / 3
    budget = Budget("max_kl", 0.6 * all_analog)
    order = [u.name for u in result.ranked(per_param=True)]
    search = search_placement(
        bench, units, order, selection, get_noise_model("pcm"), SEEDS, budget, progress=False
    )
    assert search.digital == [sensitive_layer]
    assert sensitive_layer not in search.analog_layers and len(search.analog_layers) == 6
    assert search.steps[0]["loss"] > budget.max_loss >= sum(search.losses) / 3
    # the order matters: ranked worst-first, the search keeps more parameters digital
    other = search_placement(
        bench, units, list(reversed(order)), selection, get_noise_model("pcm"), SEEDS, budget,
        progress=False,
    )  # fmt: skip
    params = {u.name: u.params for u in units}
    assert sum(params[n] for n in other.digital) > params[sensitive_layer]


def test_a_budget_the_fragile_layer_cannot_meet_on_the_chip_is_impossible(
    setup, sweep, sensitive_layer
):
    _, _, bench, selection, _ = setup
    units, result = sweep
    alone = next(u for u in result.units if u.name == sensitive_layer).mean("analog_alone")
    budget = Budget("max_kl", alone / 4, keep_analog=(sensitive_layer,))
    with pytest.raises(PlanInputError, match="impossible budget: with every unit digital"):
        search_placement(
            bench, units, [u.name for u in units], selection, get_noise_model("pcm"), SEEDS,
            budget, progress=False,
        )  # fmt: skip
    with pytest.raises(PlanInputError, match="met only with every layer digital"):
        search_placement(
            bench, units, [u.name for u in units], selection, get_noise_model("pcm"), SEEDS,
            Budget("max_kl", 0.0), progress=False,
        )  # fmt: skip


def test_budget_input_is_checked(tmp_path, setup, sweep):
    _, _, _, selection, _ = setup
    units, _ = sweep
    with pytest.raises(PlanInputError, match="impossible: no placement is better than FP"):
        Budget("max_drop", -1.0)
    with pytest.raises(PlanInputError, match="exactly one of"):
        Budget.from_mapping({"max_drop": 1, "max_kl": 0.1})
    with pytest.raises(PlanInputError, match="unknown keys \\['max_dorp'\\]"):
        Budget.from_mapping({"max_dorp": 1})
    with pytest.raises(PlanInputError, match="use max_kl"):
        Budget("max_drop", 1.0).check(selection)
    path = tmp_path / "budget.yaml"
    path.write_text("max_kl: 0.01\nkeep_digital: [model.layers.0.mlp.down_prj]\n")
    budget = Budget.from_file(path)
    with pytest.raises(PlanInputError, match="did you mean model.layers.0.mlp.down_proj"):
        resolve_units(budget.keep_digital, units, "keep_digital")
    path.write_text("max_kl: [1]\n")
    with pytest.raises(PlanInputError, match="must be a number"):
        Budget.from_file(path)


def test_blocks_group_the_layers_of_a_decoder_block(setup):
    _, _, bench, _, _ = setup
    blocks = make_units(bench.layers, "blocks")
    assert [u.name for u in blocks] == ["model.layers.0"] and len(blocks[0].layers) == 7
    assert blocks[0].params == sum(m.weight.numel() for m in bench.layers.values())
    layers = make_units(bench.layers, "layers")
    assert resolve_units(["model.layers.0"], layers, "x") == {u.name for u in layers}
    assert resolve_units(["model.layers.0.mlp.up_proj"], blocks, "x") == {"model.layers.0"}
    assert block_of("lm_head") == "lm_head"
    with pytest.raises(PlanInputError, match="units='heads'"):
        make_units(bench.layers, "heads")


def test_text_metrics_are_zero_for_the_fp_model_and_split_the_documents(setup, texts_file):
    model, tok, _, selection, held_out = setup
    assert isinstance(selection, KLMetric) and selection.score(model) == 0.0
    n_sel = sum(int(m.sum()) for _, m in selection.data.batches)
    n_held = sum(int(m.sum()) for _, m in held_out.data.batches)
    assert n_sel > 0 and n_held > 0
    ppl, _ = make_metrics(tokenizer=tok, fp_model=model, texts=texts_file, metric="ppl")
    assert isinstance(ppl, PerplexityMetric)
    fp = ppl.score(model)
    assert fp > 1.0 and ppl.loss(fp, fp) == 0.0 and ppl.loss(1.1 * fp, fp) == pytest.approx(10.0)
    with pytest.raises(PlanInputError, match="not both or none"):
        make_metrics(tokenizer=tok, fp_model=model, task="toyworld_arith", texts=texts_file)


def test_without_programming_noise_a_chip_s_eval_output_noise_is_seeded(setup):
    model, tok, _, selection, _ = setup
    bench = Bench(model, tok, afm.get_preset("ahwa-lora"), calibration_texts(steps=1))
    layers = list(bench.layers)
    first = bench.scores(layers, selection, None, [0, 1])
    assert first == bench.scores(layers, selection, None, [0, 1])  # reproducible
    assert first[0] != first[1]  # ahwa-lora keeps output noise at eval: one chip per seed
    assert bench.scores((), selection, None, [0, 1]) == [0.0, 0.0]  # all digital: FP
