#!/usr/bin/env python
"""Reproduce the AFM and AHWA-LoRA papers' experiments, stage by stage.

    python scripts/reproduce.py --scale tiny --out eval/results/tiny          # CPU, bundled model
    python scripts/reproduce.py --scale tiny --out /tmp/r --mini             # a few steps (CI)
    python scripts/reproduce.py --scale paper --out runs/paper               # prints GPU commands
    python scripts/reproduce.py --scale paper --out runs/paper --execute     # runs them (GPUs)

Every stage is a list of afm CLI invocations (``afm-train``, ``afm-eval``, ``afm-lora``)
that run in-process through their ``main(argv)``.  A stage writes under
``<out>/stages/<name>/`` and records ``stage.json`` with the hash of its inputs (its
commands, with ``<out>`` made relative, plus the output hashes of the stages it reads).
A stage whose input hash is unchanged and whose outputs exist is skipped, so an
interrupted run resumes where it stopped (``afm-train`` also resumes mid-training).
At the end ``<out>/report.md`` (tables mean ± std over noise seeds, PNGs beside it) and
``<out>/report.json`` are assembled from the stages' JSON outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_TOKEN = "<out>"


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Scale:
    """Knobs that differ between ``--scale tiny``, ``--mini`` and ``--scale paper``."""

    models: tuple[str, ...] = ("tiny",)
    seeds: int = 5
    train_sets: tuple[str, ...] = ()
    train_config: dict[str, str] = field(default_factory=dict)  # model -> run YAML
    eval_tasks: tuple[str, ...] = ("--suite", "toyworld", "--fast")
    eval_limit: tuple[str, ...] = ()
    calib: str = ""  # extra ModelSpec keys, e.g. ",calib_steps=2"
    sweep_scales: str = "0,1,2,3,4,6"
    drift_times: str = "0s,1h,1d,1w,1mo,1y,10y"
    lora_args: tuple[str, ...] = ("--steps", "800", "--noise-seeds", "5")
    ttc_args: tuple[str, ...] = ("--limit", "50", "--spread", "--max-n", "64", "--seeds", "5")
    stress_scale: float = 3.0
    threads: tuple[str, ...] = ("--threads", "1")
    # afm-lora --mode sft / grpo (TRL) on the bundled teacher: (sft flags, grpo flags)
    trl_args: tuple[tuple[str, ...], tuple[str, ...]] = (
        tuple("--steps 200 --batch-size 16 --lr 2e-3 --eval-every 50".split()),
        tuple(
            "--steps 60 --batch-size 32 --num-generations 8 --lr 1e-3 "
            "--max-completion-length 32 --eval-every 20".split()
        ),
    )
    trl_eval: tuple[str, ...] = ("--curve-n", "60", "--curve-seeds", "3")


def make_scale(scale: str, mini: bool) -> Scale:
    if scale == "paper":
        return Scale(
            models=("phi-3-mini", "llama-3.2-1b"),
            seeds=5,
            train_config={
                "phi-3-mini": "configs/train/phi3-mini-paper.yaml",
                "llama-3.2-1b": "configs/train/llama-3.2-1b-paper.yaml",
            },
            eval_tasks=("--suite", "afm_paper"),
            lora_args=("--steps", "300", "--noise-seeds", "5"),
            ttc_args=("--tasks", "gsm8k", "--max-n", "64", "--seeds", "5"),
            stress_scale=1.0,
            threads=("--device", "cuda"),
        )
    if not mini:
        return Scale(train_sets=("eval.enabled=false",))
    return Scale(
        seeds=2,
        train_sets=(
            "data.num_tokens=512",
            "data.seq_len=16",
            "data.sequences_per_shard=16",
            "data.batch_size=16",
            "train.max_steps=2",
            "train.per_device_batch_size=4",
            "train.calibration_batches=1",
            "train.save_steps=2",
            "eval.enabled=false",
            "num_threads=1",
        ),
        eval_limit=("--limit", "4"),
        calib=",calib_steps=1",
        sweep_scales="0,3",
        drift_times="0s,1y",
        lora_args=("--steps", "2", "--eval-n", "2", "--noise-seeds", "2", "--calib-steps", "1"),
        ttc_args=("--limit", "2", "--max-n", "2", "--max-new-tokens", "8", "--seeds", "1"),
        trl_args=(
            tuple("--steps 2 --batch-size 4 --eval-every 1".split()),
            tuple(
                "--steps 2 --batch-size 4 --num-generations 2 --max-completion-length 8 "
                "--eval-every 1".split()
            ),
        ),
        trl_eval=("--eval-n", "2", "--curve-n", "2", "--curve-seeds", "1", "--calib-steps", "1"),
    )


# ---------------------------------------------------------------------------- stages
Command = tuple[str, list[str]]  # (program, argv)


@dataclass
class Stage:
    """A named step: CLI commands run in order; ``deps`` are the stages it reads."""

    name: str
    commands: list[Command]
    deps: list[str] = field(default_factory=list)
    what: str = ""


def _programs() -> dict[str, Callable[[list[str]], int]]:
    from afm.cli import evaluate, lora, train

    return {"afm-train": train.main, "afm-eval": evaluate.main, "afm-lora": lora.main}


def build_stages(out: Path, sc: Scale) -> list[Stage]:
    """The pipeline for one scale; paths are under ``out``."""
    stages: list[Stage] = []
    for model in sc.models:
        tag = "" if len(sc.models) == 1 else f"{model}-"
        stages += _model_stages(model, tag, out, sc)
    return stages


def _model_stages(model: str, tag: str, out: Path, sc: Scale) -> list[Stage]:
    stages: list[Stage] = []
    S = out / "stages"
    seeds = ["--seeds", str(sc.seeds)]

    def st(n: str) -> str:
        return f"{tag}{n}"

    def d(n: str) -> Path:
        return S / st(n)

    ev = ["--quiet", *sc.threads, *sc.eval_tasks, *sc.eval_limit]
    teacher = f"path={model},label=teacher"
    teacher_io8 = f"path={model},label=teacher-io8,preset=afm-paper{sc.calib}"
    stress = ["--noise", "pcm", "--noise-opt", f"scale={sc.stress_scale:g}"]

    stages.append(
        Stage(
            st("teacher"),
            [
                (
                    "afm-eval",
                    [
                        "--model",
                        teacher,
                        "--model",
                        teacher_io8,
                        "--noise",
                        "pcm",
                        *seeds,
                        *ev,
                        "--out",
                        str(d("teacher")),
                        "--name",
                        "pcm",
                        "--title",
                        "teacher: FP, 8-bit I/O, PCM programming noise",
                    ],
                ),
                (
                    "afm-eval",
                    [
                        "--model",
                        teacher,
                        "--model",
                        teacher_io8,
                        *stress,
                        *seeds,
                        *ev,
                        "--out",
                        str(d("teacher")),
                        "--name",
                        "pcm-stress",
                        "--title",
                        f"teacher: PCM noise x{sc.stress_scale:g}",
                    ],
                ),
            ],
            what="teacher FP and under PCM programming noise (static 8-bit in/out kept)",
        )
    )

    def train(name: str, preset: str, data_from: str | None) -> Stage:
        argv = ["--model", model, "--preset", preset, "--output", str(d(name) / "model")]
        if sc.train_config.get(model):
            argv += ["--config", sc.train_config[model]]
        sets = list(sc.train_sets)
        if data_from:
            sets += [f"data_dir={d(data_from) / 'model' / 'data'}", "generate=false"]
        if not sc.train_config:
            argv.append("--quiet")
        for s in sets:
            argv += ["--set", s]
        deps = [st(data_from)] if data_from else []
        return Stage(st(name), [("afm-train", argv)], deps, what=f"distill with {preset}")

    stages.append(train("afm-paper", "afm-paper", None))
    # the tiny demo's harsher chip: the paper's chip barely bites a 3.5 M model
    names = ["afm-paper", "afm-stress", "w4a8"] if model == "tiny" else ["afm-paper", "w4a8"]
    if "afm-stress" in names:
        stages.append(train("afm-stress", "tiny-stress", "afm-paper"))
    stages.append(train("w4a8", "w4a8-qat", "afm-paper"))
    m = {n: str(d(n) / "model") for n in names}
    label = {"afm-paper": "afm-paper", "afm-stress": "afm-stress", "w4a8": "w4a8-qat"}
    students = [f"path={m[n]},label={label[n]}" for n in names]
    sdeps = [st(n) for n in names]
    sm = [a for s in students for a in ("--model", s)]
    stages.append(
        Stage(
            st("students"),
            [
                (
                    "afm-eval",
                    [
                        *sm,
                        "--noise",
                        "pcm",
                        *seeds,
                        *ev,
                        "--out",
                        str(d("students")),
                        "--name",
                        "pcm",
                        "--title",
                        "students: PCM programming noise",
                    ],
                ),
                (
                    "afm-eval",
                    [
                        *sm,
                        *stress,
                        *seeds,
                        *ev,
                        "--out",
                        str(d("students")),
                        "--name",
                        "pcm-stress",
                        "--title",
                        f"students: PCM noise x{sc.stress_scale:g}",
                    ],
                ),
            ],
            sdeps,
            what="AFM (afm-paper, tiny-stress) and W4A8 QAT students, clean and under noise",
        )
    )
    afm_names = [n for n in names if n != "w4a8"]
    rtn = [f"path={model},label=teacher-rtn-w4,rtn_w4=true"] + [
        f"path={m[n]},label={n}-rtn-w4,rtn_w4=true" for n in afm_names
    ]
    rm = [a for s in rtn for a in ("--model", s)]
    stages.append(
        Stage(
            st("rtn-w4"),
            [
                (
                    "afm-eval",
                    [
                        *rm,
                        "--noise",
                        "pcm",
                        *seeds,
                        *ev,
                        "--out",
                        str(d("rtn-w4")),
                        "--name",
                        "pcm",
                        "--title",
                        "RTN-W4: PCM programming noise",
                    ],
                ),
                (
                    "afm-eval",
                    [
                        *rm,
                        *stress,
                        *seeds,
                        *ev,
                        "--out",
                        str(d("rtn-w4")),
                        "--name",
                        "pcm-stress",
                        "--title",
                        f"RTN-W4: PCM noise x{sc.stress_scale:g}",
                    ],
                ),
            ],
            [st(n) for n in afm_names],
            what="RTN-W4 (per channel) of the teacher and of the AFM students",
        )
    )
    curves = []
    for spec in [teacher_io8, *students]:
        label = spec.split("label=")[1].split(",")[0]
        curves.append(
            (
                "afm-eval",
                [
                    "--model",
                    spec,
                    "--sweep",
                    f"noise.scale={sc.sweep_scales}",
                    "--noise",
                    "pcm",
                    *seeds,
                    *ev,
                    "--out",
                    str(d("robustness")),
                    "--name",
                    label,
                    "--title",
                    f"{label}: accuracy vs PCM noise scale",
                ],
            )
        )
    stages.append(
        Stage(st("robustness"), curves, sdeps, what="robustness curves: accuracy vs noise scale")
    )
    stages.append(
        Stage(
            st("lora"),
            [
                (
                    "afm-lora",
                    [
                        "--base",
                        m["afm-paper"],
                        "--task",
                        "mul",
                        "--output",
                        str(d("lora") / "adapter"),
                        "--preset",  # the base keeps its afm-paper chip; the evaluation is
                        "ahwa-lora",  # AHWA-LoRA's: aihwkit PCM drift (hardware-model §5c)
                        "--drift-times",
                        sc.drift_times,
                        *sc.lora_args,
                        "--quiet",
                        *(["--threads", "1"] if "--threads" in sc.threads else []),
                        *(["--device", "cuda"] if "--device" in sc.threads else []),
                    ],
                )
            ],
            [st("afm-paper")],
            what="AHWA-LoRA adapter (new toy-world task 'mul') on the analog AFM base: "
            "base vs adapter under AHWA-LoRA's evaluation noise (aihwkit PCM drift)",
        )
    )
    if model == "tiny":
        stages.append(_trl_stage(d("lora-trl"), st("lora-trl"), sc))
    ttc = []
    for spec in [teacher, *students]:
        label = spec.split("label=")[1].split(",")[0]
        tasks = [] if "--tasks" in sc.ttc_args else ["--tasks", "toyworld_arith"]
        ttc.append(
            (
                "afm-eval",
                [
                    "--ttc",
                    "--model",
                    spec,
                    *tasks,
                    *sc.ttc_args,
                    *stress,
                    "--quiet",
                    *sc.threads,
                    "--out",
                    str(d("ttc")),
                    "--name",
                    label,
                    "--title",
                    f"{label}: majority vote vs N, PCM x{sc.stress_scale:g}",
                ],
            )
        )
    stages.append(
        Stage(st("ttc"), ttc, sdeps, what="test-time compute: majority vote vs N under noise")
    )
    return stages


def _trl_stage(out: Path, name: str, sc: Scale) -> Stage:
    """AHWA-LoRA with TRL on the bundled teacher under the tiny demos' chip: an SFT
    adapter (hardware-aware, toy-world arithmetic), then GRPO on top of it with the
    exact-match reward; base / SFT / GRPO on the same chips, curves vs step."""
    common = [
        *"--base tiny --preset tiny-stress --task arith --noise pcm --quiet".split(),
        *("--noise-scale", f"{sc.stress_scale:g}", "--noise-seeds", str(sc.seeds)),
        *sc.trl_eval,
        *("--eval-out", str(out), "--threads", "1"),
    ]
    sft = ["--mode", "sft", "--output", str(out / "sft"), *sc.trl_args[0], *common]
    grpo = [
        *("--mode", "grpo", "--init-adapter", str(out / "sft"), "--output", str(out / "grpo")),
        *("--reward", "exact-match", *sc.trl_args[1], *common),
    ]
    return Stage(
        name,
        [("afm-lora", sft), ("afm-lora", grpo)],
        what="AHWA-LoRA with TRL on the bundled teacher (chip tiny-stress, PCM "
        f"x{sc.stress_scale:g} at evaluation): SFT adapter on toy-world arithmetic, then GRPO "
        "on top (exact-match reward, rollouts on the noisy chip)",
    )


# ---------------------------------------------------------------------------- hashing
def _rel(argv: list[str], out: Path) -> list[str]:
    return [a.replace(str(out), OUT_TOKEN) for a in argv]


def hash_outputs(stage_dir: Path) -> str:
    """sha256 over the relative paths and contents of a stage's files (not stage.json)."""
    h = hashlib.sha256()
    for p in sorted(stage_dir.rglob("*")):
        if not p.is_file() or p.name == "stage.json":
            continue
        h.update(str(p.relative_to(stage_dir)).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def input_hash(stage: Stage, out: Path, upstream: dict[str, str]) -> str:
    payload = {
        "name": stage.name,
        "commands": [[prog, _rel(argv, out)] for prog, argv in stage.commands],
        "upstream": {dep: upstream[dep] for dep in stage.deps},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- running
def run_stage(stage: Stage, out: Path, upstream: dict[str, str]) -> dict[str, Any]:
    """Run (or skip) one stage; returns its stage.json record."""
    stage_dir = out / "stages" / stage.name
    record_path = stage_dir / "stage.json"
    ihash = input_hash(stage, out, upstream)
    old = json.loads(record_path.read_text()) if record_path.is_file() else None
    has_outputs = stage_dir.is_dir() and any(p.name != "stage.json" for p in stage_dir.iterdir())
    if old and old.get("input_hash") == ihash and old.get("status") == "done" and has_outputs:
        print(f"[reproduce] {stage.name}: inputs unchanged, skipped")
        return {**old, "skipped": True}
    if old and old.get("input_hash") != ihash and stage_dir.exists():
        shutil.rmtree(stage_dir)  # stale outputs of other inputs
    stage_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "name": stage.name,
        "what": stage.what,
        "input_hash": ihash,
        "deps": {dep: upstream[dep] for dep in stage.deps},
        "commands": [[prog, *_rel(argv, out)] for prog, argv in stage.commands],
        "status": "running",
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[reproduce] {stage.name}: running ({stage.what})", flush=True)
    t0 = time.perf_counter()
    programs = _programs()
    for prog, argv in stage.commands:
        rc = programs[prog](list(argv))
        if rc != 0:
            raise RuntimeError(f"stage {stage.name}: {prog} exited with {rc}")
    record.update(
        status="done",
        seconds=round(time.perf_counter() - t0, 1),
        output_hash=hash_outputs(stage_dir),
    )
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "skipped": False}


def run_pipeline(stages: list[Stage], out: Path) -> dict[str, dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    records: dict[str, dict[str, Any]] = {}
    upstream: dict[str, str] = {}
    for stage in stages:
        rec = run_stage(stage, out, upstream)
        records[stage.name] = rec
        upstream[stage.name] = rec["output_hash"]
    return records


def print_commands(stages: list[Stage]) -> None:
    import shlex

    for stage in stages:
        print(f"# stage {stage.name}: {stage.what}")
        for prog, argv in stage.commands:
            launch = "accelerate launch -m afm.cli.train" if prog == "afm-train" else prog
            print(launch, " ".join(shlex.quote(a) for a in argv))
        print()


# ---------------------------------------------------------------------------- report
def _fmt(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def _lora_table(meta: dict[str, Any]) -> str:
    import statistics

    lines = [
        f"AHWA-LoRA on task `{meta['task']}` ({meta['metric']}), base `{Path(meta['base']).name}`,"
        f" r = {meta['r']}, {meta['steps']} steps, {meta['trainable_pct']:.2f} % trainable.",
        "",
        "| condition | base | base + adapter |",
        "|---|---|---|",
    ]
    for row in meta["results"]:
        cells = []
        for key in ("base", "base+adapter"):
            xs = row[key]
            s = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.fmean(xs):.3f}" + (f" ± {s:.3f}" if len(xs) > 1 else ""))
        lines.append(f"| {row['condition']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _curves(stage_dir: Path, keep: Callable[[dict[str, Any]], bool]) -> dict[str, dict]:
    """``{task: {label: [(x, mean, std)]}}`` from every afm-eval JSON of a stage."""
    out: dict[str, dict[str, list]] = {}
    for js in sorted(stage_dir.glob("*.json")):
        if js.name == "stage.json":
            continue
        rep = json.loads(js.read_text())
        for r in rep.get("rows", []):
            if r.get("x") is None or not keep(r):
                continue
            out.setdefault(r["task"], {}).setdefault(r["model"], []).append(
                (r["x"], r["mean"], r["std"])
            )
    return out


def _overlay(curves: dict[str, dict], task: str, xlabel: str, title: str, png: Path) -> str:
    """One plot with every model's curve for ``task`` + the markdown table of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = curves.get(task, {})
    xs = sorted({x for pts in lines.values() for x, _, _ in pts})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in sorted(lines.items()):
        pts = sorted(pts)
        ax.errorbar(
            [p[0] for p in pts],
            [100 * p[1] for p in pts],
            yerr=[100 * p[2] for p in pts],
            marker="o",
            capsize=3,
            label=label,
        )
    if xlabel == "N":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{task} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    head = "| model | " + " | ".join(f"{xlabel}={x:g}" for x in xs) + " |"
    rows = [head, "|---" * (len(xs) + 1) + "|"]
    for label, pts in sorted(lines.items()):
        by_x = {x: (m, sd) for x, m, sd in pts}
        cells = [
            f"{100 * by_x[x][0]:.1f} ± {100 * by_x[x][1]:.1f}" if x in by_x else "–" for x in xs
        ]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _noisy_majority(row: dict[str, Any]) -> bool:
    p = row.get("params", {})
    return p.get("method") == "majority" and p.get("condition", "fp") != "fp"


# stage-name suffix -> (rows kept, x axis, plot title, section heading, image alt text)
_SUMMARIES: dict[str, tuple[Callable[[dict[str, Any]], bool], str, str, str, str]] = {
    "robustness": (
        lambda r: True,
        "PCM noise scale",
        "accuracy vs noise",
        "Robustness, all models ({stage}; {seeds} seeds per point)",
        "robustness, all models",
    ),
    "ttc": (
        _noisy_majority,
        "N",
        "majority vote under noise",
        "Test-time compute, all models ({stage}; majority vote under noise)",
        "majority vote vs N, all models",
    ),
}


def _summary(out: Path, stages: list[Stage], seeds: int) -> list[str]:
    """Side-by-side robustness and test-time-compute curves of all models (arithmetic)."""
    md: list[str] = []
    for stage in stages:
        sdir = out / "stages" / stage.name
        for suffix, (keep, xlabel, title, heading, alt) in _SUMMARIES.items():
            if not (stage.name.endswith(suffix) and sdir.is_dir()):
                continue
            png = f"summary-{stage.name}.png"
            table = _overlay(_curves(sdir, keep), "toyworld_arith", xlabel, title, out / png)
            head = heading.format(stage=stage.name, seeds=seeds)
            md += [f"### {head}", "", table, "", f"![{alt}]({png})", ""]
    return (["## Summary (toyworld arithmetic)", "", *md]) if md else []


def write_report(
    out: Path, stages: list[Stage], records: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Assemble ``report.md`` + ``report.json`` (+ PNGs copied beside them)."""
    md = [
        f"# afm reproduction report ({meta['scale']}{', mini' if meta['mini'] else ''})",
        "",
        "Made by `scripts/reproduce.py`. Cells are accuracy in % (mean ± sample std over "
        "noise seeds) unless stated. Every stage's commands, input hash and full results "
        "(all per-seed scores) are in `report.json` (paths under the output directory "
        "written as `<out>`); a local run also keeps `stages/<name>/stage.json`.",
        "",
    ]
    data: dict[str, Any] = {**meta, "stages": {}}
    total = sum(records[st.name].get("seconds") or 0.0 for st in stages)
    md += [
        "Stage times as recorded when each stage last ran (a stage whose inputs did not",
        "change is reused, not re-run):",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {st.name} | {records[st.name].get('seconds') or 0.0:.0f} |" for st in stages),
        f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |",
        "",
    ]
    data["stage_seconds_total"] = round(total, 1)
    if not meta["mini"]:
        md += _summary(out, stages, meta["seeds"])
    for stage in stages:
        rec = records[stage.name]
        sdir = out / "stages" / stage.name
        entry: dict[str, Any] = {
            k: rec.get(k) for k in ("what", "input_hash", "output_hash", "seconds", "skipped")
        }
        entry["commands"] = rec.get("commands")
        entry["results"] = {}
        md += [f"## {stage.name}", "", stage.what, ""]
        for js in sorted(sdir.rglob("*.json"), key=lambda p: (p.stat().st_mtime_ns, str(p))):
            if js.name in ("stage.json", "config.json", "tokenizer_config.json"):
                continue
            rel = str(js.relative_to(sdir))
            if js.name == "train_summary.json":
                summ = json.loads(js.read_text())
                entry["results"][rel] = summ
                md += [f"Distilled {summ['steps']} steps, final loss {summ['final_loss']:.4f}.", ""]
            elif js.name == "afm_lora.json":
                lmeta = json.loads(js.read_text())
                entry["results"][rel] = lmeta
                md += [_lora_table(lmeta), ""]
            elif js.parent == sdir:
                rep = json.loads(js.read_text())
                if not isinstance(rep, dict) or "rows" not in rep:
                    continue
                entry["results"][rel] = rep
                md += [f"### {rep.get('title', js.stem)}", ""]
                mdfile = js.with_suffix(".md")
                if mdfile.is_file():
                    body = mdfile.read_text().strip().splitlines()
                    if body and body[0].startswith("#"):
                        body = body[1:]  # the title is above
                    md += ["\n".join(body).strip(), ""]
                else:
                    md += [
                        f"- {r['model']} / {r['task']} / {r['condition']}: "
                        f"{_fmt(r['mean'], r['std'], r['n'])}"
                        for r in rep["rows"]
                    ] + [""]
                png = js.with_suffix(".png")
                if png.is_file():
                    dest = f"{stage.name}-{png.name}"
                    shutil.copyfile(png, out / dest)
                    md += [f"![{rep.get('title', js.stem)}]({dest})", ""]
        data["stages"][stage.name] = entry
    report_md = out / "report.md"
    report_json = out / "report.json"
    report_md.write_text("\n".join(md).rstrip() + "\n")
    text = json.dumps(data, indent=2).replace(str(out), OUT_TOKEN)
    text = text.replace(str(Path(__file__).resolve().parents[1]) + "/", "")  # repo-relative
    report_json.write_text(text + "\n")
    return report_md, report_json


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=("tiny", "paper"), default="tiny")
    ap.add_argument("--out", default="eval/results/tiny", help="output directory")
    ap.add_argument("--mini", action="store_true", help="a few steps / problems / seeds (CI)")
    ap.add_argument("--only", help="comma-separated stage names to run (with their upstream)")
    ap.add_argument(
        "--execute", action="store_true", help="with --scale paper: run (GPUs) instead of print"
    )
    ap.add_argument("--print", dest="print_only", action="store_true", help="print commands")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    sc = make_scale(args.scale, args.mini)
    stages = build_stages(out, sc)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            ap.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
        by_name = {s.name: s for s in stages}
        todo = list(wanted)
        while todo:
            for dep in by_name[todo.pop()].deps:
                if dep not in wanted:
                    wanted.add(dep)
                    todo.append(dep)
        stages = [s for s in stages if s.name in wanted]
    if args.print_only or (args.scale == "paper" and not args.execute):
        print_commands(stages)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = run_pipeline(stages, out)
    meta = {
        "scale": args.scale,
        "mini": args.mini,
        "seeds": sc.seeds,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    md, js = write_report(out, stages, records, meta)
    skipped = sum(r["skipped"] for r in records.values())
    print(f"[reproduce] {len(records)} stages ({skipped} skipped); wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
