"""``afm-lora --mode sft|grpo``: one-line errors (exit 2) for bad input, and SFT then
GRPO on top of it end to end on a tiny random local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")

from afm.cli import lora as cli  # noqa: E402


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("afm-lora: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def local_model(toy_llama, tmp_path) -> Path:
    model, tok = toy_llama(max_positions=96)
    out = tmp_path / "tiny-random"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--mode", "grpo", "--reward", "no_such_mod_q:fn"], "reward 'no_such_mod_q:fn': cannot"),
        (["--mode", "sft", "--reward", "exact-match"], "--reward does not apply to --mode sft"),
        (["--eval-every", "5"], "--eval-every does not apply to --mode supervised"),
        (["--mode", "grpo", "--num-generations", "3"], "--num-generations 3 with --batch-size"),
        (["--mode", "grpo", "--init-adapter", "/nonexistent"], "--init-adapter /nonexistent"),
        (["--mode", "grpo", "--task", "facts-new"], "task 'facts-new' has no 'Answer: <int>'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, extra, match):
    argv = ["--base", "tiny", "--task", "arith", "--output", str(tmp_path / "o"), *extra]
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert match in one_error(err)
    assert not (tmp_path / "o").exists()


def test_bad_data_and_rewards_are_caught_before_training(capsys, tmp_path):
    no_prompt = jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "1"}] * 3)
    rc, _, err = run(
        capsys,
        "--mode",
        "grpo",
        "--base",
        "tiny",
        "--task",
        no_prompt,
        "--output",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "GRPO needs a 'prompt' column" in one_error(err)
    rc, _, err = run(
        capsys,
        "--mode",
        "sft",
        "--base",
        "tiny",
        "--task",
        no_prompt,
        "--output",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "SFT needs 'prompt' and 'completion'" in one_error(err)
    (tmp_path / "r.py").write_text("def one(completions, **kw):\n    return [1.0]\n")
    data = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt": f"Q: {i}+1=? A: ", "answer": str(i + 1)} for i in range(4)],
    )
    rc, _, err = run(
        capsys,
        "--mode",
        "grpo",
        "--base",
        "tiny",
        "--task",
        data,
        "--reward",
        f"{tmp_path / 'r.py'}:one",
        "--output",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "returned 1 values for 2 completions" in one_error(err)
    chat = jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    rc, _, err = run(
        capsys,
        "--mode",
        "sft",
        "--base",
        "tiny",
        "--task",
        chat,
        "--output",
        str(tmp_path / "o"),
        "--calib-steps",
        "1",
    )
    assert rc == 2 and "has no chat template: pass --chat-template" in one_error(err)
    assert not (tmp_path / "o").exists()


def test_sft_then_grpo_on_top_end_to_end(capsys, tmp_path, local_model):
    import afm.lora as L
    from afm.toyworld import arith_problems

    probs = arith_problems("train", 40, digits=(2,))
    sft_data = jsonl(
        tmp_path / "sft.jsonl", [{"prompt": p.prompt, "completion": p.solution} for p in probs]
    )
    common = [
        "--base",
        str(local_model),
        "--preset",
        "tiny-stress",
        "--r",
        "4",
        "--batch-size",
        "4",
        "--noise",
        "pcm",
        "--noise-scale",
        "3",
        "--noise-seeds",
        "2",
        "--eval-n",
        "3",
        "--calib-steps",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]
    drift = ["--noise", "pcm-drift", "--drift-times", "0s,1y"]  # the last --noise wins
    rc, out, err = run(
        capsys,
        "--mode",
        "sft",
        "--task",
        sft_data,
        "--steps",
        "2",
        "--output",
        str(tmp_path / "sft"),
        *common,
        *drift,
    )
    assert rc == 0, err
    assert "completion NLL" in out and "base+adapter" in out
    sft_meta = json.loads((tmp_path / "sft" / "afm_lora.json").read_text())
    assert [r["condition"] for r in sft_meta["results"]] == ["fp", "pcm-drift@0s", "pcm-drift@1y"]
    (tmp_path / "rw.py").write_text(
        "def brevity(completions, answer, **kw):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    grpo_data = jsonl(
        tmp_path / "grpo.jsonl", [{"prompt": p.prompt, "answer": str(p.answer)} for p in probs]
    )
    rc, out, err = run(
        capsys,
        "--mode",
        "grpo",
        "--task",
        grpo_data,
        "--steps",
        "2",
        "--init-adapter",
        str(tmp_path / "sft"),
        "--num-generations",
        "2",
        "--max-completion-length",
        "6",
        "--reward",
        "exact-match",
        "--reward",
        f"{tmp_path / 'rw.py'}:brevity",
        "--eval-every",
        "1",
        "--output",
        str(tmp_path / "grpo"),
        "--eval-out",
        str(tmp_path / "rep"),
        *common,
    )
    assert rc == 0, err
    meta = json.loads((tmp_path / "grpo" / "afm_lora.json").read_text())
    assert meta["mode"] == "grpo" and meta["metric"] == "mean reward (greedy)"
    assert meta["analog_forwards"]["train/no_grad"] > 0
    assert meta["analog_forwards"]["eval/no_grad"] == meta["analog_forwards"]["eval/grad"] == 0
    assert [p["step"] for p in meta["curve"]] == [0, 1, 2]
    assert [r["condition"] for r in meta["results"]] == ["fp", "pcm(scale=3.0)"]
    assert all(len(r["base"]) == (1 if r["condition"] == "fp" else 2) for r in meta["results"])
    report = json.loads((tmp_path / "rep" / "grpo-eval.json").read_text())
    models = {r["model"] for r in report["rows"]}
    assert models == {"base", "base+init (sft)", "base+grpo"}
    curves = json.loads((tmp_path / "rep" / "grpo-curves.json").read_text())
    assert {r["model"] for r in curves["rows"]} >= {"train reward (noisy rollouts)"}
    assert (tmp_path / "rep" / "grpo-curves.png").is_file()
    # the adapter alone was saved and loads back as afm's layer
    saved = sorted(p.name for p in (tmp_path / "grpo").iterdir())
    assert "adapter_model.safetensors" in saved and "init" not in saved
    base = L.load_analog_base(str(local_model), preset="tiny-stress")
    pm = L.load_adapter(base, tmp_path / "grpo")
    assert len(L.analog_lora_layers(pm)) == 14
