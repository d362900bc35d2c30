"""Reward functions and instruction data of afm-lora's TRL modes: loading, checking,
one-line errors naming the thing (no model is trained here)."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("peft")

from afm.lora.instruct_data import (  # noqa: E402
    InstructDataError,
    check_grpo_columns,
    held_out,
    load_rows_source,
    sft_format,
    task_rows,
    to_dataset,
)
from afm.lora.rewards import (  # noqa: E402
    RewardError,
    exact_match_reward,
    load_reward,
    probe_rewards,
)

ROWS = [{"prompt": "Q: 12+30=? A: ", "answer": "42"}, {"prompt": "Q: 1+1=? A: ", "answer": "2"}]


# --------------------------------------------------------------------------- rewards


def test_exact_match_reward_reads_the_first_line():
    comps = [
        "2+0=2, 1+3=4. Answer: 42",
        "Answer: 41",
        "no answer",
        "Answer: 4\nAnswer: 42",  # a later line does not count
        [{"role": "assistant", "content": "Answer: 42"}],
    ]
    assert exact_match_reward(comps, ["42"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert exact_match_reward(["Answer: -7"], [-7]) == [1.0]


def test_load_reward_by_name_module_path_and_file(tmp_path, monkeypatch):
    assert load_reward("exact-match").columns == ("answer",)
    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **kw):\n    return [-len(c) / 10 for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards:short")
    assert fn(prompts=["a", "b"], completions=["xy", "xyzw"]) == [-0.2, -0.4]
    assert fn.__name__ == "short"  # TRL logs rewards under this name
    by_file = load_reward(f"{tmp_path / 'my_rewards.py'}:short")
    assert by_file(prompts=["a"], completions=["x"]) == [-0.1]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("json:no_such_fn", "has no attribute 'no_such_fn'"),
        ("json:__doc__", "not a function"),
        ("just-a-name", "neither a bundled reward"),
        ("/nope/r.py:fn", "not found"),
    ],
)
def test_load_reward_errors_name_the_reward(spec, match):
    with pytest.raises(RewardError, match=match) as err:
        load_reward(spec)
    assert spec in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "result, match",
    [
        (0.5, "returned float"),
        ("1", "returned str"),
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, "x"], "'x' at position 1"),
        ([1.0, float("nan")], "nan at position 1"),
        ([True, 1.0], "True at position 0"),
    ],
)
def test_reward_results_are_checked(tmp_path, result, match):
    text = repr(result).replace("nan", "float('nan')")
    (tmp_path / "bad.py").write_text(f"def r(completions, **kw):\n    return {text}\n")
    fn = load_reward(f"{tmp_path / 'bad.py'}:r")
    with pytest.raises(RewardError, match=match):
        fn(prompts=["a", "b"], completions=["x", "y"])


def test_reward_check_accepts_none_and_tensors():
    import torch

    from afm.lora.rewards import CheckedReward

    assert CheckedReward(lambda **k: [None, 1], "f")(["a", "b"], ["x", "y"]) == [None, 1.0]
    assert CheckedReward(lambda **k: torch.tensor([0.5, 1.0]), "t")(["a", "b"], ["x", "y"]) == [
        0.5,
        1.0,
    ]


def test_probe_rewards_before_training(tmp_path):
    probe_rewards([load_reward("exact-match")], ROWS)
    with pytest.raises(RewardError, match=r"needs the dataset column\(s\) \['answer'\]"):
        probe_rewards([load_reward("exact-match")], [{"prompt": "p"}])
    (tmp_path / "boom.py").write_text("def r(completions, solution, **kw):\n    return [0.0]\n")
    with pytest.raises(RewardError, match="raised TypeError"):  # needs a missing column
        probe_rewards([load_reward(f"{tmp_path / 'boom.py'}:r")], ROWS)


# --------------------------------------------------------------------------- data


def test_sft_formats_and_missing_columns():
    chat = [{"role": "user", "content": "hi"}]
    assert sft_format(["prompt", "completion"], {"prompt": "a", "completion": "b"}, "d") == (
        "prompt-completion"
    )
    assert sft_format(["prompt", "completion"], {"prompt": chat, "completion": chat}, "d") == (
        "prompt-completion"
    )
    assert sft_format(["messages"], {"messages": chat}, "d") == "messages"
    assert sft_format(["text", "id"], {"text": "t", "id": 1}, "d") == "text"
    with pytest.raises(InstructDataError, match=r"columns \['answer', 'question'\]; SFT needs"):
        sft_format(["question", "answer"], {"question": "q", "answer": "a"}, "d.jsonl")
    with pytest.raises(InstructDataError, match="'messages' must hold lists"):
        sft_format(["messages"], {"messages": "hello"}, "d")
    with pytest.raises(InstructDataError, match="column 'prompt' must hold strings"):
        sft_format(["prompt", "completion"], {"prompt": 3, "completion": "b"}, "d")
    with pytest.raises(InstructDataError, match="GRPO needs a 'prompt' column"):
        check_grpo_columns(["question"], {"question": "q"}, "d.jsonl")


def test_task_rows_for_each_mode():
    sft = task_rows("arith", "sft")
    assert set(sft[0]) == {"prompt", "completion"} and sft[0]["prompt"].startswith("Q: ")
    grpo = task_rows("mul", "grpo")
    a, b = grpo[0]["prompt"][3:].split("=")[0].split("*")
    assert grpo[0]["answer"] == str(int(a) * int(b))
    with pytest.raises(InstructDataError, match="facts-new"):
        task_rows("facts-new", "grpo")


def test_load_rows_from_files_and_dataset_dirs(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_rows_source(str(jl))[3] == rows[3]
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n" + "\n".join(f"p{i},c{i}" for i in range(30)) + "\n")
    assert load_rows_source(str(csv))[29] == rows[29]
    to_dataset(rows).save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows_source(str(tmp_path / "saved"))) == 30
    train, ev = held_out(load_rows_source(str(jl)))
    assert len(train) + len(ev) == 30 and len(ev) >= 1
    again = held_out(load_rows_source(str(csv)))[1]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in ev]  # stable by content
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(InstructDataError, match="line 2 is not JSON"):
        load_rows_source(str(bad))
    with pytest.raises(InstructDataError, match="unknown format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_rows_source(str(tmp_path / "d.txt"))
    with pytest.raises(InstructDataError, match="cannot load dataset"):
        load_rows_source(str(tmp_path / "empty_dir_is_no_dataset"))
