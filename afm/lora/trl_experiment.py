"""``afm-lora --mode sft|grpo`` as one library call: instruction tuning or RL of an
analog-aware adapter with TRL on a frozen analog base, then evaluation under
deployment noise and drift with afm-eval's conditions, chip loop and report.

:func:`run_trl_experiment` takes a :class:`TrlExperiment` (the CLI's flags), checks
the data and the reward functions before loading a model, trains
(:func:`afm.lora.sft.sft_adapter` / :func:`afm.lora.grpo.grpo_adapter`), saves the
adapter alone (peft ``adapter_model.safetensors`` + ``adapter_config.json``) with
``afm_lora.json``, and writes afm-eval reports beside it: ``<mode>-eval.md|json|png``
(base alone, the ``--init-adapter`` it started from, the new adapter; every model on
the same programmed chips) and ``<mode>-curves.md|json|png`` (accuracy under
deployment noise and the training reward or loss vs step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm.evaluate.conditions import make_conditions
from afm.evaluate.loop import scores_under_noise
from afm.lora.experiment import OUTPUT_FILES, LoraExperiment, prepare_output, run_lora_experiment
from afm.lora.instruct_data import (
    InstructDataError,
    check_grpo_columns,
    held_out,
    is_conversational,
    load_rows_source,
    sft_format,
    task_rows,
    to_dataset,
)
from afm.lora.model import attach_lora, load_adapter, load_analog_base, trainable_report
from afm.lora.rewards import load_reward, probe_rewards
from afm.lora.trl_eval import (
    chat_template_text,
    evaluate_states,
    is_percent,
    mean_reward,
    write_curves,
)
from afm.models import load_tokenizer, resolve_model
from afm.presets import eval_noise_of, preset_of
from afm.toyworld import lora_tasks

__all__ = ["MODES", "TrlExperiment", "run_lora_mode", "run_trl_experiment"]

logger = logging.getLogger(__name__)

MODES = ("supervised", "sft", "grpo")


@dataclass
class TrlExperiment(LoraExperiment):
    """``afm-lora --mode sft|grpo``: the supervised flags plus TRL's (same names)."""

    mode: str = "sft"
    init_adapter: str | None = None
    eval_out: str | None = None
    chat_template: str | None = None
    max_length: int = 1024
    reward: list[str] | None = None  # grpo: None is ["exact-match"]
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.0
    eval_every: int = 0
    curve_seeds: int | None = None
    curve_n: int | None = None

    def check(self) -> None:
        super().check()
        if self.mode not in ("sft", "grpo"):
            raise ValueError(f"--mode {self.mode!r} is invalid here: use sft or grpo")
        if self.mode == "grpo":
            if self.num_generations < 2 or self.batch_size % self.num_generations:
                raise ValueError(
                    f"--num-generations {self.num_generations} with --batch-size "
                    f"{self.batch_size}: need >= 2 and the batch size a multiple of it"
                )
            if self.max_completion_length < 1:
                raise ValueError(f"--max-completion-length {self.max_completion_length}: >= 1")
            if not self.temperature > 0:
                raise ValueError(f"--temperature {self.temperature} is invalid: must be > 0")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every {self.eval_every} is invalid: must be >= 0")
        for flag, value in (("--curve-seeds", self.curve_seeds), ("--curve-n", self.curve_n)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value} is invalid: must be >= 1")
        if self.init_adapter and not (Path(self.init_adapter) / "adapter_config.json").is_file():
            raise ValueError(
                f"--init-adapter {self.init_adapter}: not an adapter directory "
                "(no adapter_config.json)"
            )
        if self.chat_template and not Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: file not found")

    def output_files(self) -> tuple[str, ...]:
        """The adapter's files and the TRL modes' reports (``--eval-out`` defaults to
        ``--output``): what ``--overwrite`` may replace."""
        reports = tuple(
            f"{mode}-{kind}.{ext}"
            for mode in ("sft", "grpo")
            for kind in ("eval", "curves")
            for ext in ("md", "json", "png")
        )
        return OUTPUT_FILES + reports


@dataclass
class _Data:
    train: Any
    eval_rows: list[dict[str, Any]] | None  # held-out rows of a user dataset
    task: Any  # a bundled LoraTask, or None
    calibration: list[str]


def _data(exp: TrlExperiment) -> _Data:
    """The training rows (bundled task or user dataset), checked for the mode's columns."""
    if exp.task in lora_tasks.TASKS:
        task = lora_tasks.get_task(exp.task)
        rows = task_rows(exp.task, exp.mode, exp.seed)
        return _Data(to_dataset(rows), None, task, task.calibration_texts())
    path = Path(exp.task).expanduser()
    if exp.task.startswith(("/", ".", "~")) and not path.exists():
        raise InstructDataError(f"--task {exp.task}: no such file or directory")
    ds = load_rows_source(exp.task)
    first = ds[0]
    if exp.mode == "sft":
        sft_format(ds.column_names, first, exp.task)
    else:
        check_grpo_columns(ds.column_names, first, exp.task)
    train, ev = held_out(ds)
    calib = [_flat(r) for r in train.select(range(min(128, len(train))))]
    return _Data(train, [dict(r) for r in ev], None, calib)


def _flat(row: dict[str, Any]) -> str:
    """A row as one text (input-range calibration): its string fields joined."""
    parts = []
    for key in ("prompt", "completion", "text", "messages"):
        v = row.get(key)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts += [str(m.get("content", "")) for m in v if isinstance(m, dict)]
    return "".join(parts)


def _stop_ids(tokenizer: Any) -> list[int]:
    """The toy world's answers end with a newline (``evaluate_arith`` stops there too)."""
    nl = tokenizer.convert_tokens_to_ids("Ċ")
    return [nl] if isinstance(nl, int) and nl >= 0 and nl != tokenizer.unk_token_id else []


def _evaluator(
    exp: TrlExperiment, data: _Data, tokenizer: Any, rewards: list, n: int | None
) -> tuple[str, Callable[[nn.Module], float]]:
    """``(metric, fn(model) -> score)`` on held-out data (the first ``n`` items)."""
    if data.task is not None:
        return data.task.metric, lambda m: data.task.evaluate(m, tokenizer, n)
    rows = data.eval_rows[:n] if n else data.eval_rows
    if exp.mode == "grpo":
        return "mean reward (greedy)", lambda m: mean_reward(
            m, tokenizer, rows, rewards, exp.max_completion_length
        )
    from afm.lora.train import completion_loss

    pairs = _nll_pairs(rows, tokenizer)
    return "completion NLL (lower is better)", lambda m: completion_loss(m, tokenizer, pairs)


def _nll_pairs(rows: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """Held-out SFT rows as (prompt, completion) strings (chat-templated if conversational)."""
    out = []
    for r in rows:
        if "prompt" in r and "completion" in r:
            p, c = r["prompt"], r["completion"]
            if isinstance(p, list):
                p = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                full = tokenizer.apply_chat_template(r["prompt"] + c, tokenize=False)
                c = full[len(p) :] if full.startswith(p) else full
            out.append((p, c))
        elif "messages" in r:
            msgs = r["messages"]
            p = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            out.append((p, full[len(p) :] if full.startswith(p) else full))
        else:
            out.append(("", r["text"]))
    return out


def _peft_model(exp: TrlExperiment, base: nn.Module) -> tuple[nn.Module, Any]:
    """The adapter to train ("default"; the --init-adapter kept frozen beside it as
    "init") and its trainable-parameter report (of the model with that adapter only)."""
    if not exp.init_adapter:
        pm = attach_lora(
            base,
            r=exp.r,
            alpha=exp.alpha,
            targets=exp.targets,  # default: every analog layer but the output head
            modules_to_save=exp.modules_to_save,
            seed=exp.seed,
        )
        return pm, trainable_report(pm)
    pm = load_adapter(base, exp.init_adapter, adapter_name="default", is_trainable=True)
    report = trainable_report(pm)
    pm = load_adapter(pm, exp.init_adapter, adapter_name="init")
    pm.set_adapter("default")
    return pm, report


def _conditions(exp: TrlExperiment) -> tuple[list[Any], int]:
    """afm-eval's conditions for ``--noise`` (default: the preset's evaluation noise,
    drift times and repetitions, as the supervised mode), and the number of chips."""
    if exp.noise == "none":
        return make_conditions(None), 0
    spec: dict[str, Any] = {"name": exp.noise} if exp.noise else eval_noise_of(exp.preset)
    name = spec.pop("name")
    spec["scale"] = spec.get("scale", 1.0) * exp.noise_scale if not exp.noise else exp.noise_scale
    drift = None
    if name == "pcm-drift":
        times = exp.drift_times or ",".join(preset_of(exp.preset).eval_drift_times)
        drift = [t.strip() for t in (times or "0s,1h,1d,1y").split(",")]
    seeds = exp.noise_seeds or preset_of(exp.preset).eval_seeds
    return make_conditions(name, seeds, drift, spec), seeds


def run_trl_experiment(exp: TrlExperiment) -> dict[str, Any]:
    """Train, save and evaluate (module docstring); returns the ``afm_lora.json`` dict."""
    exp.check()
    specs = exp.reward or ["exact-match"]
    rewards = [load_reward(s) for s in specs] if exp.mode == "grpo" else []
    data = _data(exp)
    if rewards:
        probe_rewards(rewards, [dict(data.train[i]) for i in range(min(2, len(data.train)))])
    resolved = resolve_model(exp.base)
    if exp.base.startswith(("/", ".", "~")) and not (Path(resolved) / "config.json").is_file():
        raise ValueError(f"base model {exp.base!r} not found (no config.json in {resolved})")
    conditions, n_seeds = _conditions(exp)
    if exp.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    if exp.threads is not None:
        torch.set_num_threads(exp.threads)
    try:
        tokenizer = load_tokenizer(resolved)
    except Exception as err:  # noqa: BLE001 - one clear line for any loading failure
        raise ValueError(f"cannot load the tokenizer of {exp.base!r}: {err}") from err
    if exp.chat_template:
        tokenizer.chat_template = chat_template_text(exp.chat_template)
    if is_conversational(data.train[0]) and not getattr(tokenizer, "chat_template", None):
        raise InstructDataError(
            f"dataset {exp.task} is conversational but the tokenizer of {exp.base!r} has no "
            "chat template: pass --chat-template FILE.jinja"
        )
    try:
        base = load_analog_base(
            resolved,
            preset=exp.preset,
            calibration_texts=data.calibration,
            tokenizer=tokenizer,
            calibration_steps=exp.calib_steps,
        )
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot load base model {exp.base!r}: {err}") from err
    base.to(exp.device)
    pm, report = _peft_model(exp, base)
    metric, evaluate = _evaluator(exp, data, tokenizer, rewards, exp.eval_n)
    curve_fn = None
    if exp.eval_every:
        _, point = _evaluator(exp, data, tokenizer, rewards, exp.curve_n or exp.eval_n)
        curve_fn = _curve_fn(conditions[-1], point, exp.curve_seeds)
    result = _train(exp, pm, tokenizer, data.train, rewards, curve_fn)
    out = prepare_output(exp)
    pm.save_pretrained(out, selected_adapters=["default"])
    label = f"base+{exp.mode}"
    states: list[tuple[str, str | None]] = [("base", None)]
    if exp.init_adapter:
        states.append((f"base+init ({Path(exp.init_adapter).name})", "init"))
    states.append((label, "default"))
    eval_report = evaluate_states(
        pm, states, conditions, evaluate, task=exp.task, metric=metric, progress=not exp.quiet
    )
    eval_dir = Path(exp.eval_out) if exp.eval_out else out
    eval_report.meta.update({"command": f"afm-lora --mode {exp.mode}", "output": str(out)})
    eval_report.write(eval_dir, f"{exp.mode}-eval", percent=is_percent(metric))
    write_curves(result, eval_dir, f"{exp.mode}-curves", metric, exp.task, conditions)
    meta = _meta(exp, report, result, metric, eval_report, label)
    meta["noise_seeds"] = n_seeds
    (out / "afm_lora.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _curve_fn(cond: Any, evaluate: Callable, n_seeds: int | None) -> Callable:
    """Scores under one condition (the last, noisiest one), one per chip: accuracy vs step."""
    seeds = list(cond.seeds)[: n_seeds or len(cond.seeds)]

    def scores(model: nn.Module) -> list[float]:
        runs = scores_under_noise(model, evaluate, cond.noise, seeds, only_analog=True)
        return [float(v) for v in runs]

    return scores


def _train(exp: TrlExperiment, pm: nn.Module, tokenizer: Any, train: Any, rewards, curve):  # noqa: ANN001, ANN202
    common = dict(
        steps=exp.steps,
        lr=exp.lr,
        batch_size=exp.batch_size,
        seed=exp.seed,
        noise=not exp.no_train_noise,
        progress=not exp.quiet,
        evaluate=curve,
        eval_every=exp.eval_every,
    )
    if exp.mode == "sft":
        from afm.lora.sft import sft_adapter

        return sft_adapter(pm, tokenizer, train, max_length=exp.max_length, **common)
    from afm.lora.grpo import grpo_adapter

    return grpo_adapter(
        pm,
        tokenizer,
        train,
        rewards,
        num_generations=exp.num_generations,
        max_completion_length=exp.max_completion_length,
        temperature=exp.temperature,
        beta=exp.beta,
        stop_token_ids=_stop_ids(tokenizer) if exp.task in lora_tasks.TASKS else None,
        **common,
    )


def _meta(exp: TrlExperiment, report, result, metric: str, eval_report, label: str) -> dict:  # noqa: ANN001
    """``afm_lora.json``: the settings, the training log, base vs adapter per condition."""
    rows = []
    for cond in eval_report.conditions:
        base = eval_report.get("base", cond, exp.task)
        ad = eval_report.get(label, cond, exp.task)
        rows.append({"condition": cond, "base": base.scores, "base+adapter": ad.scores})
    settings = {k: v for k, v in vars(exp).items() if k not in ("quiet", "threads", "device")}
    return {
        **settings,
        "train_noise": not exp.no_train_noise,
        "trainable": report.trainable,
        "total": report.total,
        "trainable_pct": report.pct,
        "final_train_loss": result.final.get("loss", float("nan")),
        "final_train_reward": result.final.get("reward"),
        "train_seconds": result.seconds,
        "analog_forwards": result.forwards,
        "train_log": result.log,
        "curve": result.curve,
        "metric": metric,
        "results": rows,
    }


#: Flags of one TRL mode only (the rest are shared with the supervised mode).
_GRPO_ONLY = {"reward", "num_generations", "max_completion_length", "temperature", "beta"}
_SFT_ONLY = {"chat_template", "max_length"}


def run_lora_mode(flags: dict[str, Any]) -> dict[str, Any]:
    """``afm-lora``'s flags → the mode's pipeline (``supervised``: today's loop,
    :func:`afm.lora.experiment.run_lora_experiment`; ``sft`` / ``grpo``:
    :func:`run_trl_experiment`).  A flag the chosen mode does not use is an error, not
    ignored."""
    mode = flags.get("mode", "supervised")
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is invalid: use one of {', '.join(MODES)}")
    shared = {f.name for f in dataclasses.fields(LoraExperiment)}
    defaults = {
        f.name: f.default for f in dataclasses.fields(TrlExperiment) if f.name not in shared
    }
    unused = {k for k in defaults if k != "mode"}
    if mode == "sft":
        unused = _GRPO_ONLY
    elif mode == "grpo":
        unused = _SFT_ONLY
    given = sorted(k for k in unused if k in flags and flags[k] != defaults[k])
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag} does not apply to --mode {mode}")
    if mode == "supervised":
        return run_lora_experiment(
            LoraExperiment(**{k: v for k, v in flags.items() if k in shared})
        )
    return run_trl_experiment(TrlExperiment(**flags))
