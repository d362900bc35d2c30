"""Tests for afm.evaluate / afm.report / afm.sweep / afm.lm_eval_model / afm-eval.

Tiny random Llama models with an in-process BPE tokenizer and lm-eval tasks written
into tmp_path (local jsonl), so nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from helpers import state_snapshot, tiny_llama_for

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from afm import evaluate as ev  # noqa: E402
from afm.analog.noise import apply_noise_, get_noise_model  # noqa: E402
from afm.evaluate.report import EvalReport, ResultRow, load_report, mean_std  # noqa: E402

TINY_DIR = Path(__file__).resolve().parents[2] / "afm" / "assets" / "tiny"
CORPUS = [
    "Q: 12+34=? A: 2+4=6, 1+3=4. Answer: 46",
    "Q: 50-21=? A: 10-1=9, 5-2-1=2. Answer: 29",
    "Mira lives in Arden. Mira keeps a cat.",
    "The cat sat by the gate in the morning.",
    "Is the sky blue? yes. Is grass red? no.",
] * 20


def make_tokenizer():
    from afm.toyworld.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=160)


def make_model(tok, seed: int = 0):
    return tiny_llama_for(tok, max_positions=256, kv_heads=2, seed=seed).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = make_tokenizer()
    model = make_model(tok)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice and a rolling-loglikelihood task over local jsonl files."""
    d = tmp_path_factory.mktemp("tasks")
    mc = [
        {"q": "Is the sky blue?", "choices": ["yes", "no"], "gold": 0},
        {"q": "Is grass red?", "choices": ["yes", "no"], "gold": 1},
        {"q": "Does Mira keep a cat?", "choices": ["yes", "no"], "gold": 0},
        {"q": "Does Mira live in Arden?", "choices": ["no", "yes"], "gold": 1},
    ]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    (d / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:4]) + "\n")
    (d / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "mc.jsonl"}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""
    )
    (d / "tiny_ppl.yaml").write_text(
        f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "ppl.jsonl"}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
    )
    return d


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- report
def test_mean_std_hand_computed():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([0.25]) == (0.25, 0.0)
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    assert s == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert all(math.isnan(v) for v in mean_std([]))


def test_report_markdown_json_png(tmp_path):
    rows = [
        ResultRow("teacher", "arith", "acc", "fp", [0.9], [None]),
        ResultRow("teacher", "arith", "acc", "pcm@1d", [0.5, 0.7], [0, 1], 86400.0, "drift_time"),
        ResultRow("teacher", "arith", "acc", "pcm@0s", [0.8, 0.6], [0, 1], 0.0, "drift_time"),
        ResultRow("afm", "arith", "acc", "pcm@1d", [0.8, 0.8], [0, 1], 86400.0, "drift_time"),
    ]
    report = EvalReport(rows, {"command": "x"}, "drift")
    md = report.to_markdown()
    assert "| teacher | pcm@1d | 2 | 60.00 ± 14.14 |" in md
    assert "| afm | pcm@1d | 2 | 80.00 ± 0.00 |" in md
    paths = report.write(tmp_path, "drift")
    assert set(paths) == {"markdown", "json", "png"}
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    back = load_report(paths["json"])
    assert back.get("teacher", "pcm@1d", "arith").std == pytest.approx(math.sqrt(0.02))
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1]["mean"] == pytest.approx(0.6)
    report.layout = "conditions"
    assert "| teacher | 90.00 | 60.00 ± 14.14 | 70.00 ± 14.14 |" in report.to_markdown()


# ---------------------------------------------------------------------------- specs
def test_model_spec_parse():
    s = ev.ModelSpec.parse("path=tiny,label=t,preset=afm-paper,rtn_w4=true,group_size=32")
    assert (s.path, s.label, s.preset, s.rtn_w4, s.group_size) == (
        "tiny",
        "t",
        "afm-paper",
        True,
        32,
    )
    assert ev.ModelSpec.parse("tiny").name == "tiny"
    assert ev.ModelSpec.parse("tiny,preset=afm-paper").name == "tiny@afm-paper"
    with pytest.raises(ev.EvalInputError, match="bad entry"):
        ev.ModelSpec.parse("path=tiny,colour=red")
    with pytest.raises(ev.EvalInputError, match="true/false"):
        ev.ModelSpec.parse("path=tiny,rtn_w4=maybe")


def test_task_spec_parse():
    assert ev.parse_tasks("a,b:5, c") == [
        ev.TaskSpec("a"),
        ev.TaskSpec("b", 5),
        ev.TaskSpec("c"),
    ]
    with pytest.raises(ev.EvalInputError):
        ev.parse_tasks(" , ")


def test_suites_parse():
    root = Path(__file__).resolve().parents[2] / "eval" / "suites"
    specs, meta = ev.load_suite(root / "afm_paper.yaml")
    shots = {s.task: s.num_fewshot for s in specs}
    assert shots["mmlu"] == 5 and shots["gsm8k_cot"] == 8 and shots["arc_challenge"] == 10
    assert shots["hellaswag"] == 5 and shots["medqa_4options"] == 2 and shots["anli"] == 7
    specs, _ = ev.load_suite("toyworld")
    assert [s.task for s in specs] == ["toyworld_arith", "toyworld_facts"]


# ---------------------------------------------------------------------------- conditions
def test_make_conditions():
    conds = ev.make_conditions("pcm-drift", seeds=3, drift_times=["0s", "1h", "1y"])
    assert [c.label for c in conds] == ["fp", "pcm-drift@0s", "pcm-drift@1h", "pcm-drift@1y"]
    assert [c.x for c in conds[1:]] == [0.0, 3600.0, 365 * 86400.0]
    assert conds[3].noise.t_inference == 365 * 86400.0
    assert conds[1].seeds == (0, 1, 2) and conds[0].seeds == (0,)
    with pytest.raises(ev.EvalInputError, match="invalid duration"):
        ev.make_conditions("pcm-drift", seeds=2, drift_times=["1 fortnight"])
    with pytest.raises(ev.EvalInputError, match="drift"):
        ev.make_conditions("pcm", seeds=2, drift_times=["1h"])
    with pytest.raises(ev.EvalInputError, match="seeds"):
        ev.make_conditions("pcm", seeds=0)
    with pytest.raises(ev.EvalInputError, match="unknown noise model"):
        ev.make_conditions("quantum", seeds=1)


# ---------------------------------------------------------------------------- lm-eval path
def test_lm_eval_two_seeds_mean_std_and_restore(tiny, task_dir):
    model, tok, _ = tiny
    runner = ev.LmEvalRunner(
        [ev.TaskSpec(str(task_dir / "tiny_mc.yaml")), ev.TaskSpec(str(task_dir / "tiny_ppl.yaml"))],
        batch_size=4,
    )
    conds = ev.make_conditions("gaussian", seeds=[3, 7], noise_options={"std": 0.5})
    before = state_snapshot(model)
    report = ev.run_evaluation([("m", model, tok)], runner, conds, progress=False)
    assert_same(before, state_snapshot(model))  # noise restored bitwise
    row = report.get("m", conds[1].label, "tiny_ppl")
    assert row.metric == "word_perplexity,none" and row.seeds == [3, 7]
    assert row.mean == pytest.approx(statistics.mean(row.scores))
    assert row.std == pytest.approx(statistics.stdev(row.scores))
    fp = report.get("m", "fp", "tiny_ppl").scores[0]
    assert len(set(row.scores + [fp])) == 3  # each seed is a different chip
    # each seed's score is what the noisy model scores on its own
    with apply_noise_(model, conds[1].noise, 7):
        direct = runner.run(model, tok)
    assert direct["tiny_ppl"][1] == pytest.approx(row.scores[1], rel=1e-6)
    assert runner.run(model, tok)["tiny_ppl"][1] == pytest.approx(fp, rel=1e-6)
    mc = report.get("m", "fp", "tiny_mc")
    assert mc.metric == "acc,none" and 0.0 <= mc.scores[0] <= 1.0


def test_comparison_and_drift_plot(tiny, task_dir, tmp_path):
    model, tok, _ = tiny
    other = make_model(tok, seed=1)
    runner = ev.LmEvalRunner([ev.TaskSpec(str(task_dir / "tiny_ppl.yaml"))], batch_size=4)
    conds = ev.make_conditions("pcm-drift", seeds=2, drift_times=["0s", "1d"])
    report = ev.run_evaluation(
        [("a", model, tok), ("b", other, tok)], runner, conds, progress=False
    )
    assert report.models == ["a", "b"]
    md = report.to_markdown()
    assert "| a | pcm-drift@1d | 2 |" in md and "| b | fp | 1 |" in md
    paths = report.write(tmp_path, "drift")
    assert paths["png"].stat().st_size > 1000


def test_unknown_task_and_include_path(task_dir):
    with pytest.raises(ev.EvalInputError, match="unknown task 'tiny_mcq'.*tiny_mc"):
        ev.LmEvalRunner([ev.TaskSpec("tiny_mcq")], include_path=[task_dir])
    with pytest.raises(ev.EvalInputError, match="does not exist"):
        ev.LmEvalRunner([ev.TaskSpec("x.yaml")])
    runner = ev.LmEvalRunner([ev.TaskSpec("tiny_mc")], include_path=[task_dir])
    assert [names for _, _, names in runner.loaded] == [["tiny_mc"]]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ev.EvalInputError, match="not found"):
        ev.load_model_spec(ev.ModelSpec(str(tmp_path / "nope")))
    with pytest.raises(ev.EvalInputError, match="unknown preset"):
        ev.check_model_spec(ev.ModelSpec(str(tmp_path), preset="nope"))


def test_afm_lm_registered_with_noise(tiny, task_dir):
    from lm_eval.api.registry import get_model

    from afm.evaluate.lm_eval_model import AfmLM

    _, _, path = tiny
    assert get_model("afm") is AfmLM
    lm = AfmLM(str(path), preset="afm-paper", calib="none", noise="pcm", noise_seed=1)
    from afm.analog.convert import analog_layers

    assert analog_layers(lm.model)  # converted on the fly
    noisy = state_snapshot(lm.model)
    lm.restore_noise()
    clean = state_snapshot(lm.model)
    assert any(not torch.equal(noisy[k], clean[k]) for k in clean)
    lm.apply_noise(get_noise_model("pcm"), 1)
    assert_same(noisy, state_snapshot(lm.model))  # same seed, same chip


# ---------------------------------------------------------------------------- sweeps
def test_sweep_conditions_and_config_restore(tiny, task_dir):
    from afm.analog.convert import analog_layers
    from afm.evaluate.sweep import parse_axis, sweep_conditions

    assert parse_axis("io.bits=4,6,none") == ("io.bits", [4, 6, None])
    with pytest.raises(ev.EvalInputError):
        parse_axis("io.bits")
    conds = sweep_conditions(["noise.scale=0,2", "io.bits=4,none"], noise="pcm", seeds=2)
    assert [c.label for c in conds] == [
        "noise.scale=0",
        "noise.scale=2",
        "io.bits=4",
        "io.bits=None",
    ]
    assert conds[1].noise.scale == 2 and conds[1].x == 2.0
    assert conds[2].config_changes == (("input.bits", 4), ("output.bits", 4))
    with pytest.raises(ev.EvalInputError, match="no field"):
        sweep_conditions(["noise.volume=1"])
    _, tok, path = tiny
    model, tok = ev.load_model_spec(ev.ModelSpec(str(path), preset="afm-paper", calib_steps=1))
    layers = analog_layers(model)
    cfg_before = {n: lay.analog_config for n, lay in layers.items()}
    before = state_snapshot(model)
    runner = ev.LmEvalRunner([ev.TaskSpec(str(task_dir / "tiny_ppl.yaml"))], batch_size=4)
    det = sweep_conditions(["io.bits=2,16"], seeds=3)
    assert all(c.noise is None and c.seeds == (0,) for c in det)  # deterministic: once
    report = ev.run_evaluation([("m", model, tok)], runner, det + conds, progress=False)
    assert {n: lay.analog_config for n, lay in layers.items()} == cfg_before
    assert_same(before, state_snapshot(model))
    ppl = {c: report.get("m", c, "tiny_ppl").mean for c in report.conditions}
    assert ppl["io.bits=2"] != ppl["io.bits=16"]  # bit widths really change the model
    with ev.analog_config_changes(model, [("input.bits", 5)]):
        assert all(lay.analog_config.input.bits == 5 for lay in layers.values())
    assert {n: lay.analog_config for n, lay in layers.items()} == cfg_before


def test_config_changes_need_analog_layers(tiny):
    model, _, _ = tiny
    with pytest.raises(ev.EvalInputError, match="analog layers"):
        with ev.analog_config_changes(model, [("input.bits", 4)]):
            pass


# ---------------------------------------------------------------------------- CLI
def _run_cli(capsys, *argv):
    from afm.cli.evaluate import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--model", "/does/not/exist", "--tasks", "toyworld_arith"], "not found"),
        (["--tasks", "toyworld_arth"], "unknown task"),
        (["--tasks", "toyworld_arith", "--noise", "pcm-drift", "--drift-times", "1x"], "duration"),
        (["--tasks", "toyworld_arith", "--ttc", "--max-n", "0"], "positive"),
        (["--tasks", "toyworld_arith", "--ttc", "--ns", "1,-2"], "positive"),
        (["--tasks", "toyworld_arith", "--seeds", "0", "--noise", "pcm"], "seeds"),
        (["--tasks", "toyworld_arith", "--limit", "0"], "limit"),
        (["--suite", "no_such_suite"], "suite"),
    ],
)
def test_cli_bad_input_one_line(capsys, tiny, argv, msg):
    _, _, path = tiny
    if "--model" not in argv:
        argv = ["--model", str(path)] + argv
    rc, _, err = _run_cli(capsys, *argv, "--quiet")
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("afm-eval: error")]
    assert len(lines) == 1 and msg in lines[0], err


def test_cli_missing_model_exits_2(capsys):
    from afm.cli.evaluate import main

    assert main(["--tasks", "toyworld_arith"]) == 2  # every afm CLI returns its status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err


def test_cli_eval_writes_files(capsys, tiny, task_dir, tmp_path):
    _, _, path = tiny
    rc, out, _ = _run_cli(
        capsys,
        "--model",
        f"path={path},label=rand",
        "--tasks",
        str(task_dir / "tiny_ppl.yaml"),
        "--noise",
        "pcm-drift",
        "--drift-times",
        "0s,1y",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
    )
    assert rc == 0
    assert "| rand | pcm-drift@1y | 2 |" in out
    data = json.loads((tmp_path / "drift.json").read_text())
    assert {r["condition"] for r in data["rows"]} == {"fp", "pcm-drift@0s", "pcm-drift@1y"}
    assert (tmp_path / "drift.png").exists() and (tmp_path / "drift.md").exists()
    assert data["meta"]["command"].startswith("afm-eval")


# ---------------------------------------------------------------------------- toy world
@pytest.mark.skipif(
    not (TINY_DIR / "config.json").is_file(), reason="the tiny teacher is not trained yet"
)
def test_tiny_teacher_toyworld_arith_through_wrapper():
    model, tok = ev.load_model_spec(ev.ModelSpec("tiny"))
    runner = ev.LmEvalRunner([ev.TaskSpec("toyworld_arith")], limit=4, batch_size=4)
    report = ev.run_evaluation([("tiny", model, tok)], runner, [ev.Condition("fp")], progress=False)
    acc = report.get("tiny", "fp", "toyworld_arith").mean
    fast = ev.ToyRunner(["toyworld_arith"], limit=4).run(model, tok)["toyworld_arith"][1]
    assert acc == pytest.approx(fast)  # the fast path scores the same problems the same way
    assert 0.0 <= acc <= 1.0


def test_spread_subsets(task_dir):
    from afm.evaluate.runners import ToyRunner, spread_indices

    assert spread_indices(200, 4) == [0, 50, 100, 150]
    assert spread_indices(5, None) == [0, 1, 2, 3, 4]
    assert spread_indices(5, 10) == [0, 1, 2, 3, 4]
    assert spread_indices(10, 0.5) == [0, 2, 4, 6, 8]
    first = ToyRunner(["toyworld_arith"], limit=8)._data["toyworld_arith"]
    spread = ToyRunner(["toyworld_arith"], limit=8, spread=True)._data["toyworld_arith"]
    assert len(first) == len(spread) == 8
    # the bundled file is sorted by kind: spread covers every (digits, op), first does not
    kinds = {(p.n_digits, p.op) for p in spread}
    assert len(kinds) > len({(p.n_digits, p.op) for p in first})
