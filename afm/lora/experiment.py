"""``afm-lora`` as one library call: train an adapter on a frozen analog base, evaluate
base vs base + adapter without and under deployment noise.

:func:`run_lora_experiment` takes a :class:`LoraExperiment` (the CLI's flags), checks
it before loading anything, trains, saves the adapter (peft
``adapter_model.safetensors`` + ``adapter_config.json``) and ``afm_lora.json``
(settings and results), and returns the results; :func:`format_lora_table` renders
them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.analog.noise import NoiseModel, get_noise_model, parse_duration
from afm.evaluate.loop import scores_under_noise
from afm.evaluate.report import mean_std
from afm.lora.model import attach_lora, load_analog_base, trainable_report
from afm.lora.train import completion_loss, train_adapter
from afm.models import load_tokenizer, resolve_model
from afm.presets import eval_noise_of, preset_of
from afm.toyworld import lora_tasks
from afm.validation import check_device, check_output_path, check_safetensors_files

__all__ = [
    "LoraExperiment",
    "evaluate_under_noise",
    "format_lora_table",
    "held_out_split",
    "prepare_output",
    "run_lora_experiment",
]

logger = logging.getLogger(__name__)


def evaluate_under_noise(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    noise_model: NoiseModel | None = None,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[float]:
    """``evaluate(model)`` once per deployment-noise seed (one programmed chip each).

    The noise goes on the analog layers only (adapters stay digital) and is restored
    bitwise after each seed; None evaluates once without deployment noise.  Layer noise
    depends on the seed and the layer name, so every adapter of one ``PeftModel`` (and
    the base with ``disable_adapter()``) sees the same chip for the same seed.
    """
    runs = scores_under_noise(model, evaluate, noise_model, seeds, only_analog=True)
    return [float(v) for v in runs]


def held_out_split(pairs: list[tuple[str, str]]) -> tuple[list, list]:
    """``(train, eval)`` of a user dataset: ~10 % held out by a stable hash of the pair."""

    def held_out(p: tuple[str, str]) -> bool:
        return hashlib.blake2b("".join(p).encode(), digest_size=2).digest()[0] < 26

    eval_pairs = [p for p in pairs if held_out(p)] or pairs[:1]
    train_pairs = [p for p in pairs if not held_out(p)] or pairs
    return train_pairs, eval_pairs


@dataclass
class LoraExperiment:
    """Everything ``afm-lora`` takes (its flags, by the same names)."""

    base: str
    task: str
    output: str
    preset: str = "ahwa-lora"
    r: int = 8
    alpha: float = 32
    targets: list[str] | None = None
    modules_to_save: list[str] | None = None
    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    no_train_noise: bool = False
    calib_steps: int = 20
    noise: str | None = None
    """None: the preset's evaluation noise (``afm.presets.eval_noise_of``)."""
    noise_scale: float = 1.0
    drift_times: str | None = None
    """None: the preset's drift times (pcm-drift: ``0s,1h,1d,1y`` if it has none)."""
    noise_seeds: int | None = None
    """None: the preset's repetitions (``Preset.eval_seeds``)."""
    eval_n: int | None = None
    device: str = "cpu"
    threads: int | None = None
    quiet: bool = False
    overwrite: bool = False
    """Replace a previous afm-lora adapter in ``output`` (other files are never touched)."""

    def check(self) -> None:
        """The cheap checks, before anything is loaded (``ValueError`` naming the flag)."""
        if self.r < 1:
            raise ValueError(f"--r {self.r} is invalid: the LoRA rank must be >= 1")
        for flag, value in (("--alpha", self.alpha), ("--lr", self.lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} {value} is invalid: must be a finite number > 0")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise ValueError(f"--noise-scale {self.noise_scale} is invalid: must be >= 0")
        for flag, value, low in (
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--noise-seeds", self.noise_seeds, 1),
            ("--calib-steps", self.calib_steps, 0),
            ("--eval-n", self.eval_n, 1),
            ("--threads", self.threads, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"{flag} {value} is invalid: must be >= {low}")
        check_device("", "--device", self.device)
        _check_output(Path(self.output), self.overwrite, self.output_files())

    def output_files(self) -> tuple[str, ...]:
        """The files this mode writes into ``output`` (what ``overwrite`` may replace)."""
        return OUTPUT_FILES


#: What afm-lora writes into its output directory (peft's adapter files and its own).
OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "afm_lora.json")


def prepare_output(exp: LoraExperiment) -> Path:
    """``exp.output`` checked again (minutes have passed since :meth:`LoraExperiment.check`),
    created, and cleared of a previous adapter's files (``--overwrite``: none stays)."""
    out = Path(exp.output)
    own = exp.output_files()
    _check_output(out, exp.overwrite, own)
    out.mkdir(parents=True, exist_ok=True)
    for name in own:
        (out / name).unlink(missing_ok=True)
    return out


def _check_output(out: Path, overwrite: bool, own: tuple[str, ...]) -> None:
    """``--output`` must be new or empty; with ``overwrite`` it may hold a previous
    afm-lora adapter (the files ``own``), and nothing else."""
    check_output_path("--output", out)
    if not out.is_dir():
        return
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ValueError(
            f"--output {str(out)!r} is not empty; choose a new or empty directory (or pass "
            "--overwrite to replace an afm-lora adapter saved there)"
        )
    foreign = [e for e in entries if e not in own]
    if foreign:
        raise ValueError(
            f"--output {str(out)!r} holds files that are not an afm-lora adapter (e.g. "
            f"{foreign[0]!r}); --overwrite only replaces an adapter: choose a new or empty "
            "directory"
        )


def _save(peft_model: Any, exp: LoraExperiment, meta: dict[str, Any]) -> None:
    """The adapter and ``afm_lora.json`` into ``exp.output`` (a previous one replaced)."""
    out = prepare_output(exp)
    peft_model.save_pretrained(out)
    (out / "afm_lora.json").write_text(json.dumps(meta, indent=2) + "\n")


def _task(exp: LoraExperiment) -> tuple[Any, list[tuple[str, str]] | None]:
    """The bundled task, or the pairs of a ``.jsonl`` file."""
    task_path = Path(exp.task)
    if exp.task in lora_tasks.TASKS:
        return lora_tasks.get_task(exp.task), None
    if task_path.suffix == ".jsonl" and task_path.is_file():
        try:
            return None, lora_tasks.examples_from_jsonl(task_path.read_text().splitlines())
        except ValueError as err:
            raise ValueError(f"--task {exp.task}: {err}") from None
    raise ValueError(
        f"unknown task {exp.task!r}: use a bundled task ({', '.join(lora_tasks.TASKS)}) "
        "or an existing .jsonl file of prompt/completion pairs"
    )


def _noise_models(exp: LoraExperiment) -> list[tuple[str, NoiseModel | None]]:
    """``no noise`` and the deployment noise (one model per drift time): ``--noise`` or,
    by default, the preset's evaluation protocol (``ahwa-lora``: aihwkit PCM drift)."""
    out: list[tuple[str, NoiseModel | None]] = [("no noise", None)]
    if exp.noise == "none":
        return out
    spec: dict[str, Any] = {"name": exp.noise} if exp.noise else eval_noise_of(exp.preset)
    spec["scale"] = exp.noise_scale
    name = spec.pop("name")
    if name == "pcm-drift":
        times = exp.drift_times or ",".join(preset_of(exp.preset).eval_drift_times)
        for t in (times or "0s,1h,1d,1y").split(","):
            secs = parse_duration(t.strip())
            nm = get_noise_model(name, **{**spec, "t_inference": secs})
            out.append((f"pcm-drift t={t.strip()}", nm))
    else:
        nm = get_noise_model(name, **spec)
        out.append((nm.label, nm))
    return out


def _noise_seeds(exp: LoraExperiment) -> int:
    return exp.noise_seeds or preset_of(exp.preset).eval_seeds


def _check_base(exp: LoraExperiment) -> str:
    resolved = resolve_model(exp.base)
    looks_local = resolved.startswith(("/", ".", "~")) or Path(resolved).exists()
    if looks_local and not (Path(resolved).expanduser() / "config.json").is_file():
        raise ValueError(f"base model {exp.base!r} not found (no config.json in {resolved})")
    if looks_local:
        check_safetensors_files(Path(resolved).expanduser())
    return resolved


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _evaluation(exp: LoraExperiment, task: Any, tokenizer: Any, eval_pairs: list | None):
    if task is not None:
        return task.metric, lambda m: task.evaluate(m, tokenizer, exp.eval_n)
    return "completion NLL (lower is better)", lambda m: completion_loss(m, tokenizer, eval_pairs)


def run_lora_experiment(exp: LoraExperiment) -> dict[str, Any]:
    """Train, save and evaluate (module docstring); returns the ``afm_lora.json`` dict."""
    exp.check()
    task, pairs = _task(exp)
    resolved = _check_base(exp)
    noise_models = _noise_models(exp)
    if exp.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if exp.threads is not None:
        torch.set_num_threads(exp.threads)
    try:
        tokenizer = load_tokenizer(resolved)
    except Exception as err:  # noqa: BLE001 - one clear line for any loading failure
        raise ValueError(f"cannot load the tokenizer of {exp.base!r}: {_first_line(err)}") from err
    if task is not None:
        train_pairs, eval_pairs = task.train_examples(exp.seed), None
        calib = task.calibration_texts()
    else:
        train_pairs, eval_pairs = held_out_split(pairs)
        calib = [p + c for p, c in train_pairs[:128]]
    try:
        base = load_analog_base(
            resolved,
            preset=exp.preset,
            calibration_texts=calib,
            tokenizer=tokenizer,
            calibration_steps=exp.calib_steps,
        )
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot load base model {exp.base!r}: {_first_line(err)}") from err
    base.to(exp.device)
    peft_model = attach_lora(
        base,
        r=exp.r,
        alpha=exp.alpha,
        targets=exp.targets,
        modules_to_save=exp.modules_to_save,
        seed=exp.seed,
    )
    report = trainable_report(peft_model)
    logger.info("afm-lora: %s", report)
    result = train_adapter(
        peft_model,
        tokenizer,
        train_pairs,
        steps=exp.steps,
        lr=exp.lr,
        batch_size=exp.batch_size,
        seed=exp.seed,
        noise=not exp.no_train_noise,
        progress=not exp.quiet,
    )
    metric, evaluate = _evaluation(exp, task, tokenizer, eval_pairs)
    seeds = list(range(_noise_seeds(exp)))
    rows = []
    with torch.no_grad():  # scoped: also called in-process (tests, notebooks)
        for label, nm in noise_models:
            with peft_model.disable_adapter():
                base_vals = evaluate_under_noise(peft_model, evaluate, nm, seeds)
            ad_vals = evaluate_under_noise(peft_model, evaluate, nm, seeds)
            rows.append({"condition": label, "base": base_vals, "base+adapter": ad_vals})
    meta = {
        "base": exp.base,
        "preset": exp.preset,
        "task": exp.task,
        "r": exp.r,
        "alpha": exp.alpha,
        "targets": exp.targets,
        "modules_to_save": exp.modules_to_save,
        "steps": exp.steps,
        "lr": exp.lr,
        "batch_size": exp.batch_size,
        "seed": exp.seed,
        "train_noise": not exp.no_train_noise,
        "noise_seeds": len(seeds),
        "trainable": report.trainable,
        "total": report.total,
        "trainable_pct": report.pct,
        "final_train_loss": result.final_loss,
        "metric": metric,
        "results": rows,
    }
    _save(peft_model, exp, meta)
    return meta


def format_lora_table(meta: dict[str, Any], noise_seeds: int) -> str:
    """The base vs base + adapter table of :func:`run_lora_experiment`'s result."""
    lines = [
        f"{meta['metric']} on task {meta['task']!r} ({noise_seeds} noise seeds per noisy "
        "condition)",
        f"{'condition':<28} {'base':>16} {'base+adapter':>16}",
    ]
    for row in meta["results"]:
        cells = []
        for key in ("base", "base+adapter"):
            m, s = mean_std(row[key])
            cells.append(f"{m:.3f} ± {s:.3f}" if len(row[key]) > 1 else f"{m:.3f}")
        lines.append(f"{row['condition']:<28} {cells[0]:>16} {cells[1]:>16}")
    return "\n".join(lines)
