#!/usr/bin/env python
"""Bad-input drill: a table of bad inputs against the five CLIs and the library.

    python scripts/bad_input_drill.py                 # every case, each CLI in a subprocess
    python scripts/bad_input_drill.py --only train    # the cases whose name contains "train"
    python scripts/bad_input_drill.py --list          # the table, nothing run

Every case must be refused cleanly.  A CLI case is

* a **clean error** when the command exits with status 2 and stderr holds exactly one
  line ``afm-<cmd>: error: ...`` and no traceback;
* **silently accepted** when it exits with status 0;
* a **traceback** otherwise (any other status, or a Python traceback on stderr).

A library case is a clean error when it raises a ``ValueError`` / ``OSError`` /
``ImportError`` (what the CLIs print as one line), silently accepted when it returns,
a traceback when it raises anything else.  The goal is 0 tracebacks, 0 silently
accepted.

Runs on a tiny random Llama and a tokenizer trained in-process (nothing downloaded),
small settings so that a case that is wrongly accepted still ends in seconds.  The
table (:data:`CASES`) is also what ``tests/cli/test_bad_input.py`` runs in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Settings that make an afm-train case that is wrongly accepted end in seconds.
SMALL_TRAIN = (
    "--quiet",
    "--set", "data.num_tokens=512",
    "--set", "data.seq_len=16",
    "--set", "data.sequences_per_shard=16",
    "--set", "data.batch_size=16",
    "--set", "train.max_steps=2",
    "--set", "train.per_device_batch_size=4",
    "--set", "train.calibration_batches=1",
    "--set", "num_threads=1",
)  # fmt: skip
SMALL_LORA = ("--quiet", "--task", "mul", "--steps", "1", "--eval-n", "2", "--noise-seeds", "1")
SMALL_EVAL = ("--quiet", "--tasks", "toyworld_arith", "--fast", "--limit", "2", "--seeds", "1")
SMALL_GEN = ("--quiet", "--set", "num_tokens=64", "--set", "seq_len=8")

MODULES = {
    "afm-train": "afm.cli.train",
    "afm-generate": "afm.cli.generate",
    "afm-eval": "afm.cli.evaluate",
    "afm-lora": "afm.cli.lora",
    "afm-export": "afm.cli.export",
}


@dataclass(frozen=True)
class Case:
    """One bad input.  ``args`` are the CLI's arguments with ``{name}`` placeholders for
    the fixtures (:func:`build_fixtures`) and ``{out}`` (a fresh path); a library case
    has ``call(fixtures)`` instead."""

    name: str
    target: str
    """``afm-train`` ... ``afm-export``, or ``library``."""
    needle: str
    """A piece of the one-line error (the field, file or value it must name)."""
    args: tuple[str, ...] = ()
    call: Callable[[dict[str, str]], Any] | None = None
    env: tuple[tuple[str, str], ...] = ()


def _train(name: str, needle: str, *args: str, model: str = "{model}", **kw: Any) -> Case:
    return Case(
        name,
        "afm-train",
        needle,
        ("--model", model, "--output", "{out}", *SMALL_TRAIN, *args),
        **kw,
    )


def _set(key_value: str) -> tuple[str, str]:
    return ("--set", key_value)


def _lib(name: str, needle: str, call: Callable[[dict[str, str]], Any], **kw: Any) -> Case:
    return Case(name, "library", needle, call=call, **kw)


# --------------------------------------------------------------------------- library calls
def _distill_config(**kwargs: Any) -> Callable[[dict[str, str]], Any]:
    def call(_f: dict[str, str]) -> Any:
        from afm.training.distill_config import DistillConfig

        return DistillConfig(**kwargs)

    return call


def _run_config(*sets: str) -> Callable[[dict[str, str]], Any]:
    def call(f: dict[str, str]) -> Any:
        from afm.training.run_config import build_run_config

        return build_run_config(f["model"], f["out"], sets=list(sets))

    return call


def _convert_include(f: dict[str, str]) -> Any:
    from afm.analog.convert import convert
    from afm.models import load_model
    from afm.presets import get_preset

    return convert(load_model(f["model"]), get_preset("afm-paper"), include=["no_such_layer"])


def _eval_out_file(f: dict[str, str]) -> Any:
    from afm.evaluate.command import EvalRequest, run_eval_request

    req = EvalRequest(models=[f["model"]], tasks="toyworld_arith", fast=True, limit=2, seeds="1")
    req.out, req.quiet = f["file"], True
    return run_eval_request(req)


def _lora_nonempty(f: dict[str, str]) -> Any:
    from afm.lora.experiment import LoraExperiment, run_lora_experiment

    exp = LoraExperiment(f["model"], "mul", f["nonempty"], steps=1, eval_n=2, noise_seeds=1)
    return run_lora_experiment(exp)


def _export_truncated(f: dict[str, str]) -> Any:
    from afm.export.int4 import export_int4

    return export_int4(f["trunc"], f["out"])


def _generate_cuda(f: dict[str, str]) -> Any:
    from afm.training.data import generate_for_model
    from afm.training.data_config import SyntheticDataConfig

    return generate_for_model(f["model"], f["out"], SyntheticDataConfig(), device="cuda")


def _load_empty_shard(f: dict[str, str]) -> Any:
    from afm.training.shards import load_synthetic_data

    return load_synthetic_data(f["empty_shard"])


def _distill_oov(f: dict[str, str]) -> Any:
    from afm.models import load_model
    from afm.training.distill import distill, make_student
    from afm.training.distill_config import DistillConfig
    from afm.training.shards import load_synthetic_data

    teacher = load_model(f["model"])
    cfg = DistillConfig(max_steps=1, per_device_batch_size=4, calibration_batches=0)
    data = load_synthetic_data(f["oov"])
    return distill(teacher, make_student(teacher), data, cfg, f["out"], progress=False)


def _export_skip_nothing(f: dict[str, str]) -> Any:
    from afm.export.int4 import export_int4

    return export_int4(f["model"], f["out"], skip=("no_such_layer",))


def _out(target: str, name: str, needle: str, *args: str, **kw: Any) -> Case:
    """A case whose arguments are all given (no fresh --output / --out added)."""
    return Case(name, target, needle, args, **kw)


def _gen(name: str, needle: str, *args: str, model: str = "{model}", **kw: Any) -> Case:
    argv = ("--model", model, "--output", "{out}", *SMALL_GEN, *args)
    return Case(name, "afm-generate", needle, argv, **kw)


def _eval(name: str, needle: str, *args: str, model: str = "{model}", **kw: Any) -> Case:
    argv = ("--model", model, "--out", "{out}", *SMALL_EVAL, *args)
    return Case(name, "afm-eval", needle, argv, **kw)


def _lora(name: str, needle: str, *args: str, base: str = "{model}", **kw: Any) -> Case:
    argv = ("--base", base, "--output", "{out}", *SMALL_LORA, *args)
    return Case(name, "afm-lora", needle, argv, **kw)


def _export(name: str, needle: str, *args: str, model: str = "{model}", **kw: Any) -> Case:
    return Case(name, "afm-export", needle, ("--model", model, "--out", "{out}", *args), **kw)


OFFLINE = (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"))
TRAIN_SMALL_OUT = ("--model", "{model}", *SMALL_TRAIN)

CASES: list[Case] = [
    # ---------------------------------------------------------------- afm-train (§3–5)
    _train("train lr=inf", "train.lr=inf", *_set("train.lr=.inf")),
    _train("train weight_decay=nan", "train.weight_decay=nan", *_set("train.weight_decay=.nan")),
    _train(
        "train num_epochs=inf",
        "train.num_epochs=inf",
        *_set("train.num_epochs=.inf"),
        *_set("train.max_steps=null"),
    ),
    _train("train adam_eps=0", "train.adam_eps", *_set("train.adam_eps=0")),
    _train("train adam_beta2=1", "train.adam_beta2", *_set("train.adam_beta2=1")),
    _train("train lr_end >= lr", "train.lr_end", *_set("train.lr_end=1")),
    _train("train lr_power=nan", "train.lr_power", *_set("train.lr_power=.nan")),
    _train("train temperature=inf", "train.temperature", *_set("train.temperature=.inf")),
    _train("train max_grad_norm=inf", "train.max_grad_norm", *_set("train.max_grad_norm=.inf")),
    _train(
        "train boolean given as 2",
        "train.gradient_checkpointing",
        *_set("train.gradient_checkpointing=2"),
    ),
    _train("train eval.enabled not a bool", "eval.enabled", *_set("eval.enabled=maybe")),
    _train("train eval.curve_scales inf", "eval.curve_scales", *_set("eval.curve_scales=[.inf]")),
    _train("train data.temperature=nan", "data.temperature", *_set("data.temperature=.nan")),
    _train("train num_threads=0", "num_threads", *_set("num_threads=0")),
    _train(
        "train teacher_device=cuda without a GPU",
        "train.teacher_device",
        *_set("train.teacher_device=cuda"),
    ),
    _train("train teacher_device bogus", "train.teacher_device", *_set("train.teacher_device=x")),
    _train(
        "train seq_len beyond the context (GPT-2)",
        "data.seq_len=4096",
        *_set("data.seq_len=4096"),
        *_set("data.num_tokens=8192"),
        model="{gpt2}",
    ),
    _train("train data.backend=vllm without vLLM", "data.backend", *_set("data.backend=vllm")),
    _train(
        "train prompts file missing",
        "prompts file",
        *_set("data.prompts_file={tmp}/no-prompts.txt"),
    ),
    _train(
        "train batch larger than the data",
        "train.per_device_batch_size",
        *_set("train.per_device_batch_size=1000"),
    ),
    _train("train truncated checkpoint as --model", "model.safetensors", model="{trunc}"),
    _train(
        "train empty shard",
        "holds no sequences",
        *_set("data_dir={empty_shard}"),
        *_set("generate=false"),
    ),
    _train(
        "train token ids outside the vocabulary",
        "outside the model's vocabulary",
        *_set("data_dir={oov}"),
        *_set("generate=false"),
    ),
    _out(
        "afm-train",
        "train --output is a file",
        "a file, not a directory",
        *TRAIN_SMALL_OUT,
        "--output",
        "{file}",
    ),
    _out(
        "afm-train",
        "train --output cannot be created",
        "cannot be created",
        *TRAIN_SMALL_OUT,
        "--output",
        "{file}/sub",
    ),
    _out(
        "afm-train",
        "train --output holds other files",
        "holds no afm-train run",
        *TRAIN_SMALL_OUT,
        "--output",
        "{nonempty}",
    ),
    _train("train unknown model", "cannot load model", model="no-such-model-xyz", env=OFFLINE),
    # ---------------------------------------------------------------- afm-generate
    _gen("generate --device cuda without a GPU", "--device", "--device", "cuda"),
    _gen("generate --device bogus", "not a torch device", "--device", "bogus"),
    _out(
        "afm-generate",
        "generate --output is a file",
        "--output",
        "--model",
        "{model}",
        "--output",
        "{file}",
        *SMALL_GEN,
    ),
    _out(
        "afm-generate",
        "generate --output holds other files",
        "holds no synthetic data",
        "--model",
        "{model}",
        "--output",
        "{nonempty}",
        *SMALL_GEN,
    ),
    _gen("generate backend=vllm without vLLM", "data.backend", "--set", "backend=vllm"),
    _gen(
        "generate seq_len beyond the context",
        "data.seq_len",
        "--set",
        "seq_len=4096",
        model="{gpt2}",
    ),
    _gen("generate truncated checkpoint", "model.safetensors", model="{trunc}"),
    _gen("generate temperature=nan", "data.temperature", "--set", "temperature=.nan"),
    # ---------------------------------------------------------------- afm-eval
    _eval("eval --out is a file", "--out", "--out", "{file}"),
    _eval("eval --out cannot be created", "cannot be created", "--out", "{file}/sub"),
    _eval("eval --name leaves --out", "--name", "--name", "../../escaped"),
    _out(
        "afm-eval",
        "eval malformed suite YAML",
        "not valid YAML",
        *("--model", "{model}", "--out", "{out}", "--suite", "{bad_suite}", "--quiet"),
    ),
    _out(
        "afm-eval",
        "eval suite entry with a bad num_fewshot",
        "num_fewshot",
        *("--model", "{model}", "--out", "{out}", "--suite", "{bad_shots_suite}", "--quiet"),
    ),
    _eval("eval --threads 0", "--threads", "--threads", "0"),
    _eval("eval --device cuda without a GPU", "--device", "--device", "cuda"),
    _eval("eval --device bogus", "--device", "--device", "bogus"),
    _eval("eval truncated checkpoint", "model.safetensors", model="{trunc}"),
    _eval("eval --limit nan", "--limit", "--limit", "nan"),
    _eval("eval --batch-size 0", "--batch-size", "--batch-size", "0"),
    _out(
        "afm-eval",
        "eval hub task while offline",
        "hellaswag",
        *("--model", "{model}", "--out", "{out}", "--tasks", "hellaswag", "--limit", "2"),
        *("--seeds", "1", "--quiet"),
        env=OFFLINE,
    ),
    # ---------------------------------------------------------------- afm-lora
    _out(
        "afm-lora",
        "lora --output holds other files",
        "not empty",
        *("--base", "{model}", "--output", "{nonempty}", *SMALL_LORA),
    ),
    _out(
        "afm-lora",
        "lora --output is a file",
        "--output",
        *("--base", "{model}", "--output", "{file}", *SMALL_LORA),
    ),
    _out(
        "afm-lora",
        "lora --overwrite over other files",
        "not an afm-lora adapter",
        *("--base", "{model}", "--output", "{nonempty}", "--overwrite", *SMALL_LORA),
    ),
    _lora("lora --threads 0", "--threads", "--threads", "0"),
    _lora("lora --device cuda without a GPU", "--device", "--device", "cuda"),
    _lora("lora truncated base", "model.safetensors", base="{trunc}"),
    _lora("lora --lr inf", "--lr", "--lr", "inf"),
    # ---------------------------------------------------------------- afm-export
    _export("export truncated checkpoint", "model.safetensors", model="{trunc}"),
    _out(
        "afm-export", "export --out is a file", "is a file", "--model", "{model}", "--out", "{file}"
    ),
    _export("export --group-size 0", "group", "--group-size", "0"),
    _export(
        "export --skip matches no layer",
        "no_such_layer",
        "--skip",
        "no_such_layer",
    ),
    # ---------------------------------------------------------------- library entry points
    _lib("DistillConfig(lr=inf)", "train.lr", _distill_config(lr=math.inf)),
    _lib(
        "DistillConfig(weight_decay=nan)",
        "train.weight_decay",
        _distill_config(weight_decay=math.nan),
    ),
    _lib(
        "build_run_config num_epochs=.inf", "train.num_epochs", _run_config("train.num_epochs=.inf")
    ),
    _lib("run_eval_request out= a file", "--out", _eval_out_file),
    _lib("run_lora_experiment into a non-empty directory", "not empty", _lora_nonempty),
    _lib("export_int4 of a truncated checkpoint", "model.safetensors", _export_truncated),
    _lib("generate_for_model device=cuda without a GPU", "--device", _generate_cuda),
    _lib("load_synthetic_data with an empty shard", "holds no sequences", _load_empty_shard),
    _lib("distill on token ids outside the vocabulary", "vocabulary", _distill_oov),
    _lib(
        "export_int4 skip= matching no layer",
        "no_such_layer",
        _export_skip_nothing,
    ),
    _lib("convert include= matching no layer", "no_such_layer", _convert_include),
]


# --------------------------------------------------------------------------- fixtures
def _write_shards(out: Path, rows_per_shard: list[list[list[int]]]) -> None:
    from afm.training.shards import write_shard

    out.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(rows_per_shard):
        write_shard(out, i, rows)


def build_fixtures(work: Path) -> dict[str, str]:
    """Models, damaged files and data the cases point at (built once, in ``work``)."""
    import torch
    import transformers

    from afm import toyworld
    from afm.analog.convert import convert
    from afm.analog.hf import attach_quantization_config
    from afm.presets import get_preset
    from afm.toyworld.tokenizer import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    docs = list(itertools.islice(toyworld.training_documents(), 200))
    tok = train_tokenizer(docs, vocab_size=300)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            pad_token_id=tok.pad_token_id, **special,
        )
    )  # fmt: skip
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, **special
        )
    )
    f = {k: str(work / k) for k in ("model", "gpt2", "analog", "trunc", "tmp")}
    for key, model in (("model", llama), ("gpt2", gpt2)):
        model.save_pretrained(f[key])
        tok.save_pretrained(f[key])
    convert(llama, get_preset("afm-paper"))
    attach_quantization_config(llama)
    llama.save_pretrained(f["analog"])
    tok.save_pretrained(f["analog"])
    shutil.copytree(f["analog"], f["trunc"])
    weights = Path(f["trunc"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    Path(f["tmp"]).mkdir()
    f["file"] = str(work / "a-file.txt")
    Path(f["file"]).write_text("not a directory\n")
    f["nonempty"] = str(work / "notes")
    Path(f["nonempty"]).mkdir()
    (Path(f["nonempty"]) / "keep-me.txt").write_text("a user's file\n")
    f["bad_suite"] = str(work / "bad-suite.yaml")
    Path(f["bad_suite"]).write_text("tasks: [toyworld_arith\n  - num_fewshot: 3\n")
    f["bad_shots_suite"] = str(work / "bad-shots.yaml")
    Path(f["bad_shots_suite"]).write_text(
        "tasks:\n  - task: toyworld_arith\n    num_fewshot: many\n"
    )
    f["empty_shard"] = str(work / "data-empty-shard")
    _write_shards(Path(f["empty_shard"]), [[[1, 5, 6, 7]] * 8, []])
    f["oov"] = str(work / "data-oov")
    _write_shards(Path(f["oov"]), [[[1, 5, 6, 100_000]] * 8])
    return f


def expand(case: Case, fixtures: dict[str, str], out: str) -> list[str]:
    """The case's arguments with the fixture paths filled in."""
    values = {**fixtures, "out": out}
    return [a.format(**values) for a in case.args]


# --------------------------------------------------------------------------- running
@dataclass
class Result:
    case: Case
    verdict: str  # "clean", "traceback", "accepted"
    detail: str
    seconds: float = 0.0
    needle_found: bool = True
    extra: list[str] = field(default_factory=list)


def judge_cli(prog: str, rc: int, stderr: str) -> tuple[str, str]:
    """``(verdict, the error line or the reason)`` of one CLI run."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    if rc == 0:
        return "accepted", "exit status 0"
    if rc == 2 and len(errors) == 1 and "Traceback (most recent call last)" not in stderr:
        return "clean", errors[0]
    tail = lines[-1] if lines else ""
    return "traceback", f"exit status {rc}: {tail[:200]}"


def run_cli_case(case: Case, fixtures: dict[str, str], out: str, timeout: int) -> Result:
    argv = [sys.executable, "-m", MODULES[case.target], *expand(case, fixtures, out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **dict(case.env)}
    env.pop("AFM_DEBUG", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(case, "accepted", f"still running after {timeout} s", timeout)
    verdict, detail = judge_cli(case.target, proc.returncode, proc.stderr)
    return Result(case, verdict, detail, time.perf_counter() - t0, case.needle in detail)


def judge_library(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except (ValueError, OSError, ImportError) as err:
        return "clean", f"{type(err).__name__}: {' '.join(str(err).split())}"
    except Exception as err:  # noqa: BLE001 - what the drill is looking for
        return "traceback", f"{type(err).__name__}: {str(err)[:200]}"
    return "accepted", "returned normally"


def run_library_case(case: Case, fixtures: dict[str, str], out: str) -> Result:
    saved = {k: os.environ.get(k) for k, _ in case.env}
    os.environ.update(dict(case.env))
    t0 = time.perf_counter()
    try:
        verdict, detail = judge_library(lambda: case.call({**fixtures, "out": out}))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return Result(case, verdict, detail, time.perf_counter() - t0, case.needle in detail)


def _print_table(results: list[Result]) -> None:
    marks = {"clean": "ok", "traceback": "TRACEBACK", "accepted": "ACCEPTED"}
    for r in results:
        warn = "" if r.needle_found or r.verdict != "clean" else f"  (missing {r.case.needle!r})"
        head = f"{marks[r.verdict]:<10} {r.seconds:6.1f}s  {r.case.target:<12} {r.case.name}"
        print(f"{head}{warn}")
        print(f"{'':<10}          {r.detail[:220]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--work", type=Path, help="fixture directory (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per CLI case")
    parser.add_argument("--list", action="store_true", help="print the table and stop")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only in c.name]
    if args.list:
        for c in cases:
            print(f"{c.target:<12} {c.name}  (must name {c.needle!r})")
        return 0
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        fixtures = build_fixtures(work / "fixtures")
        results = []
        for i, case in enumerate(cases):
            out = str(work / f"out-{i:03d}")
            if case.target == "library":
                results.append(run_library_case(case, fixtures, out))
            else:
                results.append(run_cli_case(case, fixtures, out, args.timeout))
            print(f"[{i + 1}/{len(cases)}] {results[-1].verdict:<9} {case.name}", flush=True)
    print()
    _print_table(results)
    counts = {v: sum(r.verdict == v for r in results) for v in ("clean", "traceback", "accepted")}
    wrong = sum(r.verdict == "clean" and not r.needle_found for r in results)
    print()
    print(
        f"tried {len(results)} / clean errors {counts['clean']} / tracebacks "
        f"{counts['traceback']} / silently accepted {counts['accepted']}"
    )
    if wrong:
        print(f"({wrong} clean errors do not name what the table expects)")
    return 0 if counts["traceback"] == counts["accepted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
