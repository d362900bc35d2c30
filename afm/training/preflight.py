"""What ``afm-train`` checks before it writes anything, so that a failed start leaves
no trace and the corrected command is not refused as "a different run".

* :func:`check_output_dir` — the output is a directory (or can be one) that is empty,
  new, or holds this very run;
* :func:`finished_summary` / :func:`same_evaluation` — a finished run, and whether its
  evaluation settings are the ones asked for now;
* :func:`load_teacher` — the teacher's files are whole and it loads; an analog
  checkpoint becomes its digital self (the teacher of a distillation is digital);
* :func:`check_inputs` — devices, sampling backend, prompts, sequence length against
  the model's context, existing data (readable, ids within the vocabulary) and a
  dataset large enough for one global batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from afm.analog.convert import revert
from afm.analog.layers import analog_layers
from afm.models import load_model, load_tokenizer, resolve_model
from afm.training.corpus import check_corpus
from afm.training.data import read_prompts, sampling_backend
from afm.training.data_checks import check_seq_len, check_token_ids
from afm.training.data_config import DataError
from afm.training.files import is_temporary, lock_name, read_json
from afm.training.run_config import ConfigError, RunConfig
from afm.training.shards import complete_shards, load_synthetic_data
from afm.validation import check_device, check_output_path, check_safetensors_files

__all__ = [
    "LOCK",
    "SUMMARY",
    "check_inputs",
    "check_output_dir",
    "finished_summary",
    "load_teacher",
    "pad_id_of",
    "same_evaluation",
]

logger = logging.getLogger(__name__)

SUMMARY = "train_summary.json"
LOCK = lock_name("afm-train")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _saved_config(out: Path) -> dict[str, Any]:
    saved = read_json(out / "run_config.json", "run configuration")
    if not isinstance(saved, dict):
        raise ConfigError(f"{str(out / 'run_config.json')!r} is damaged (not a mapping)")
    return saved


def check_output_dir(cfg: RunConfig) -> bool:
    """Raise if ``cfg.output`` cannot be written or holds another run; True if it holds
    this one (resume), False if it is new or empty."""
    out = check_output_path("--output", cfg.output)
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / "run_config.json").exists():
        started = all(e.name == LOCK or is_temporary(e.name) for e in out.iterdir())
        if started:  # a start killed before its run_config.json was in place
            return False
        raise ConfigError(
            f"output directory {str(out)!r} is not empty and holds no afm-train run; "
            "choose another --output"
        )
    old = _saved_config(out)
    ident_new = json.loads(json.dumps(cfg.identity()))
    ident_old = {k: v for k, v in old.items() if k in ident_new}
    # a run written before corpus.* existed had none
    ident_old.setdefault("corpus", ident_new["corpus"] if not cfg.corpus.enabled else None)
    for sec in ("train", "data", "corpus"):
        if isinstance(ident_old.get(sec), dict):
            ident_old[sec] = {k: v for k, v in ident_old[sec].items() if k in ident_new[sec]}
    diff = _diff_keys(ident_old, ident_new)
    if diff:
        raise ConfigError(
            f"output directory {str(out)!r} holds a different run (differs in "
            f"{', '.join(diff[:5])}); choose another --output or delete it"
        )
    _check_max_steps(old, cfg, out)
    return True


def _check_max_steps(old: dict[str, Any], cfg: RunConfig, out: Path) -> None:
    """``train.max_steps`` may be raised (the run is extended), never lowered."""
    before = (old.get("train") or {}).get("max_steps")
    now = cfg.train.max_steps
    if before == now:
        return
    if before is None or now is None or now < before:
        raise ConfigError(
            f"output directory {str(out)!r} holds a run with train.max_steps={before}; "
            f"train.max_steps={now} can only raise it (extend the run) — choose another "
            "--output for a different run"
        )


def finished_summary(cfg: RunConfig) -> dict[str, Any] | None:
    """The ``train_summary.json`` of a finished run in ``cfg.output`` (None: unfinished)."""
    path = Path(cfg.output) / SUMMARY
    if not path.exists():
        return None
    summary = read_json(path, "run summary")
    if not isinstance(summary, dict):
        raise ConfigError(f"{str(path)!r} is damaged (not a mapping); delete it to finish again")
    if cfg.train.max_steps is not None and summary.get("steps", 0) < cfg.train.max_steps:
        logger.info(
            "extending the finished run from %s to %d steps",
            summary.get("steps"),
            cfg.train.max_steps,
        )
        return None  # a raised train.max_steps: the run continues from its last checkpoint
    return summary


def same_evaluation(cfg: RunConfig) -> bool:
    """True when the finished run was evaluated with the settings of ``cfg.eval``."""
    old = _saved_config(Path(cfg.output)).get("eval")
    return old == json.loads(json.dumps(cfg.to_dict()["eval"]))


def pad_id_of(tokenizer: Any) -> int:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad_id


def load_teacher(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The digital FP teacher and its tokenizer.

    A local checkpoint's safetensors files are checked first (a truncated file is one
    line naming it).  An analog checkpoint (afm layers) is reverted to its digital
    weights: the teacher is always digital, and the student is a fresh copy of it on
    the chip ``cfg.preset`` with freshly calibrated input ranges.
    """
    resolved = resolve_model(cfg.model)
    if Path(resolved).is_dir():
        check_safetensors_files(resolved)
    teacher = load_model(cfg.model, dtype=torch.float32)
    tokenizer = load_tokenizer(cfg.model)
    layers = analog_layers(teacher)
    if layers:
        logger.warning(
            "%s is an analog checkpoint (%d AnalogLinear layers): the teacher is its "
            "digital weights (afm.revert), the student gets chip %s and calibrates its "
            "input ranges anew",
            cfg.model,
            len(layers),
            cfg.preset,
        )
        revert(teacher)
    return teacher, tokenizer


def _expected_rows(cfg: RunConfig, dataset: Any) -> int:
    if cfg.generate:
        return cfg.data.num_shards * cfg.data.sequences_per_shard
    return len(dataset)


def check_inputs(cfg: RunConfig, world: int, teacher: torch.nn.Module, tokenizer: Any) -> None:
    """Everything the run reads, checked before it writes (module docstring)."""
    check_device("train", "teacher_device", cfg.train.teacher_device)
    if cfg.corpus.enabled:
        check_corpus(cfg.corpus, tokenizer)  # a bad path or column
        if cfg.train.kd_targets not in ("auto", "live"):
            raise DataError(
                f"train.kd_targets={cfg.train.kd_targets!r} with corpus.path: corpus rows hold "
                "no cached teacher targets; use train.kd_targets=auto or live"
            )
    if not cfg.uses_synthetic_data:
        return  # the corpus is packed (and its rows counted) when the run starts
    data_dir = cfg.resolved_data_dir
    missing_shards = not cfg.generate or len(complete_shards(data_dir)) < cfg.data.num_shards
    if cfg.generate and missing_shards:
        sampling_backend(cfg.data)  # vLLM present; the targets' needs
        if cfg.data.prompts_file:
            read_prompts(cfg.data.prompts_file, tokenizer)
        check_seq_len(cfg.data, teacher.config, cfg.model)
    dataset = None
    if not cfg.generate or complete_shards(data_dir):
        dataset = load_synthetic_data(data_dir, require_complete=not cfg.generate)
        check_token_ids(dataset, teacher.get_input_embeddings().num_embeddings, data_dir)
    t = cfg.train
    batch = t.per_device_batch_size * world * t.grad_accum_steps
    rows = _expected_rows(cfg, dataset)
    if rows < batch:
        raise ConfigError(
            f"train.per_device_batch_size={t.per_device_batch_size} is invalid: one global "
            f"batch ({batch} = {t.per_device_batch_size} per device x {world} processes x "
            f"{t.grad_accum_steps} accumulation) needs more sequences than the data holds "
            f"({rows})"
        )
