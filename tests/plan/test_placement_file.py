"""A placement is an afm config: afm.convert, afm-eval and afm-train take it as it is;
deployment noise leaves its digital layers alone; runners split documents in halves."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import afm
from afm.analog.hf import AfmQuantizationConfig, read_quantization_config
from afm.analog.noise import PCMProgrammingNoise
from afm.evaluate.loading import check_model_spec, load_model_spec
from afm.evaluate.loop import programmed
from afm.evaluate.runners import ToyRunner, doc_indices
from afm.evaluate.specs import EvalInputError, ModelSpec
from afm.training.report import analog_teacher
from afm.training.run_config import ConfigError, build_run_config

Q0 = "model.layers.0.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


def _placement(path, modules, chip="afm-paper", **kw):
    qc = AfmQuantizationConfig(afm.get_preset(chip), modules=modules, **kw)
    path.write_text(json.dumps(qc.to_dict()))
    return path


def test_convert_takes_exactly_the_listed_layers_with_their_configs(tiny_model):
    model = tiny_model("llama")
    ideal = afm.get_preset("ideal")
    qc = AfmQuantizationConfig("afm-paper", modules=[Q0, DOWN1], overrides={DOWN1: ideal.to_dict()})
    afm.convert(model, qc)
    layers = afm.analog_layers(model)
    assert sorted(layers) == sorted([Q0, DOWN1])
    assert layers[DOWN1].analog_config == ideal
    assert layers[Q0].analog_config == afm.get_preset("afm-paper")
    assert isinstance(model.get_submodule("model.layers.1.self_attn.q_proj"), nn.Linear)


def test_convert_with_a_placement_can_make_the_tied_head_analog(tiny_model):
    model = tiny_model("llama")  # ties lm_head to the embedding
    emb = model.get_input_embeddings().weight.detach().clone()
    afm.convert(model, AfmQuantizationConfig("afm-paper", modules=["lm_head", Q0]))
    assert isinstance(model.lm_head, afm.AnalogLinear)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize(
    "modules,overrides,needle",
    [
        (["model.layers.0.self_attn.nope"], {}, "does not have"),
        (["model.norm"], {}, "not a linear layer"),
        ([Q0], {DOWN1: "ideal"}, "overrides for layers it does not list"),
    ],
)
def test_convert_refuses_a_placement_naming_what_the_model_lacks(
    tiny_model, modules, overrides, needle
):
    qc = AfmQuantizationConfig("afm-paper", modules=modules, overrides=overrides)
    with pytest.raises(ValueError, match=needle):
        afm.convert(tiny_model("llama"), qc)


def test_convert_with_a_placement_takes_no_other_selection(tiny_model):
    with pytest.raises(ValueError, match="converts exactly its modules"):
        afm.convert(
            tiny_model("llama"), AfmQuantizationConfig("afm-paper", modules=[Q0]), exclude=["mlp"]
        )


def test_read_quantization_config_reads_placements_and_checkpoints(tiny_model, tmp_path):
    path = _placement(tmp_path / "placement.json", [Q0, DOWN1])
    assert read_quantization_config(path).modules == [Q0, DOWN1]
    # an afm checkpoint's config.json is a placement too: same layers, same configs
    model = tiny_model("llama")
    afm.convert(model, afm.get_preset("afm-paper"), exclude=["mlp"])
    afm.attach_quantization_config(model)
    model.save_pretrained(tmp_path / "ckpt")
    qc = read_quantization_config(tmp_path / "ckpt" / "config.json")
    fresh = afm.convert(tiny_model("llama"), qc)
    assert sorted(afm.analog_layers(fresh)) == sorted(afm.analog_layers(model))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        read_quantization_config(tmp_path / "bad.json")
    (tmp_path / "plain.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="plain.json.*holds no afm quantization_config"):
        read_quantization_config(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="does not exist"):
        read_quantization_config(tmp_path / "missing.json")


def test_noise_programs_only_the_analog_layers_of_a_mixed_model(tiny_model):
    model = tiny_model("llama")
    afm.convert(model, AfmQuantizationConfig("afm-paper", modules=[Q0]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in programmed(model, PCMProgrammingNoise(), [0]):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{Q0}.weight"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored
    plain = tiny_model("llama")  # no analog layers: every linear layer but the head
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for _ in programmed(plain, PCMProgrammingNoise(), [0]):
        changed = {n for n, p in plain.named_parameters() if not torch.equal(p, before[n])}
    assert len(changed) == 14


def test_doc_indices_split_documents_into_disjoint_halves():
    first, second = doc_indices(11, split=(0, 2)), doc_indices(11, split=(1, 2))
    assert not set(first) & set(second) and sorted(first + second) == list(range(11))
    assert doc_indices(11, 3, spread=True, split=(1, 2)) == [1, 3, 7]  # of 1, 3, 5, 7, 9
    assert doc_indices(11, 2, split=(0, 2)) == [0, 2]
    a = ToyRunner(["toyworld_arith"], split=(0, 2))._data["toyworld_arith"]
    b = ToyRunner(["toyworld_arith"], split=(1, 2))._data["toyworld_arith"]
    assert len(a) == len(b) == 100 and not {p.prompt for p in a} & {p.prompt for p in b}
    with pytest.raises(EvalInputError, match="split"):
        ToyRunner(["toyworld_arith"], split=(2, 2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, toy_llama):
    model, tok = toy_llama(max_positions=128)
    d = tmp_path_factory.mktemp("model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_afm_eval_model_spec_takes_a_placement(model_dir, tmp_path):
    path = _placement(tmp_path / "p.json", [Q0, DOWN1])
    spec = ModelSpec.parse(f"path={model_dir},placement={path},calib_steps=1")
    assert spec.placement == str(path) and spec.name.endswith("@p")
    model, _ = load_model_spec(spec)
    assert sorted(afm.analog_layers(model)) == sorted([Q0, DOWN1])
    assert afm.analog_layers(model)[Q0].input_range.item() != 3.0  # calibrated
    with pytest.raises(EvalInputError, match="preset or placement"):
        check_model_spec(ModelSpec(str(model_dir), preset="afm-paper", placement=str(path)))
    with pytest.raises(EvalInputError, match="placement: .*does not exist"):
        check_model_spec(ModelSpec(str(model_dir), placement=str(tmp_path / "none.json")))


def test_afm_train_takes_a_placement_planned_on_its_chip(model_dir, tmp_path, toy_llama):
    path = _placement(tmp_path / "p.json", [Q0, DOWN1], chip="tiny-stress")
    cfg = build_run_config(str(model_dir), "o", preset="tiny-stress", sets=[f"placement={path}"])
    assert cfg.student_placement().modules == [Q0, DOWN1]
    assert "placement p.json" in cfg.eval_chip_name
    with pytest.raises(ConfigError, match="planned on another chip.*weight_noise"):
        build_run_config(str(model_dir), "o", preset="afm-paper", sets=[f"placement={path}"])
    ideal = {Q0: afm.get_preset("ideal").to_dict()}
    over = _placement(tmp_path / "o.json", [Q0], chip="tiny-stress", overrides=ideal)
    with pytest.raises(ConfigError, match="no per-layer config overrides"):
        build_run_config(str(model_dir), "o", preset="tiny-stress", sets=[f"placement={over}"])
    with pytest.raises(ConfigError, match="placement: .*does not exist"):
        build_run_config(str(model_dir), "o", sets=[f"placement={tmp_path / 'none.json'}"])
    # the analog teacher of the before/after table gets the same layers
    teacher, tok = toy_llama(max_positions=128)
    batch = tok(["Q: 1+2=? A: 1+2=3. Answer: 3"], return_tensors="pt")
    t = analog_teacher(teacher, "tiny-stress", [dict(batch)], layers=[Q0, DOWN1])
    assert sorted(afm.analog_layers(t)) == sorted([Q0, DOWN1])


SMALL = [
    "--set", "data.num_tokens=256",
    "--set", "data.seq_len=16",
    "--set", "data.sequences_per_shard=16",
    "--set", "data.batch_size=16",
    "--set", "train.max_steps=2",
    "--set", "train.per_device_batch_size=4",
    "--set", "train.calibration_batches=1",
    "--set", "num_threads=1",
]  # fmt: skip


def test_afm_train_distils_a_student_with_the_placement(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from afm.cli import train as train_cli

    path = _placement(tmp_path / "p.json", [Q0, DOWN1])
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--output", str(out), "--quiet", *SMALL]
    assert train_cli.main([*argv, "--set", f"placement={path}"]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["placement"] == str(path)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert sorted(afm.analog_layers(student)) == sorted([Q0, DOWN1])


def test_lm_eval_tasks_get_disjoint_halves_of_their_documents(model_dir, monkeypatch):
    import lm_eval.evaluator

    from afm.plan.metrics import make_metrics

    seen = []

    def fake_evaluate(lm, task_dict, limit, samples, **kwargs):
        seen.append((limit, samples))
        return {"results": {"toyworld_arith": {"exact_match,answer": 0.25}}}

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", fake_evaluate)
    model, tok = load_model_spec(ModelSpec(str(model_dir)))
    selection, held_out = make_metrics(
        tokenizer=tok, fp_model=model, task="toyworld_arith:0", limit=5
    )
    assert selection.name == "toyworld_arith" and selection.score(model) == 0.25
    held_out.score(model)
    (limit_a, a), (limit_b, b) = seen
    assert limit_a is None and limit_b is None
    a, b = a["toyworld_arith"], b["toyworld_arith"]
    assert len(a) == len(b) == 5 and all(i % 2 == 0 for i in a) and all(i % 2 for i in b)
    assert selection.loss(0.25, 0.5) == 25.0
