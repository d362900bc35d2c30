"""``afm-train``: synthetic data from the teacher, distillation into an analog student.

    afm-train --model tiny --output runs/tiny
    afm-train --model phi-3-mini --config configs/train/phi3-mini-paper.yaml --output runs/phi3
    accelerate launch --config_file configs/accelerate/ddp-8gpu.yaml -m afm.cli.train ...

Every option of the run is a key of the YAML (``--config``) and can be set with
``--set key=value`` (e.g. ``--set train.lr=1e-4 --set data.num_tokens=1e6``).
The output directory receives the final model (loads with
``AutoModelForCausalLM.from_pretrained`` after ``import afm``), its tokenizer,
``run_config.json`` / ``run_config.yaml`` (the resolved config), ``data/`` (the
synthetic shards), ``checkpoints/``, ``log.jsonl`` and ``eval.json``.  Running
the same command again resumes an interrupted run; a directory that holds a
different run is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from afm.cli._common import CliError, make_parser, run_cli, setup_logging

logger = logging.getLogger("afm.train")
PROG = "afm-train"


def _parser():  # noqa: ANN202
    p = make_parser(PROG, __doc__)
    p.add_argument("--model", help="alias (tiny, phi-3-mini, ...), local directory or hub id")
    p.add_argument("--preset", help="hardware preset of the student (default afm-paper)")
    p.add_argument("--config", help="run YAML (keys: model, preset, data.*, train.*, eval.*)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key"
    )
    p.add_argument("--output", help="output directory")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    return p


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_output_dir(cfg: Any) -> bool:
    """Raise if ``cfg.output`` holds another run; True if it holds this one (resume)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise CliError(f"output {str(out)!r} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    saved = out / "run_config.json"
    if not saved.exists():
        raise CliError(
            f"output directory {str(out)!r} is not empty and holds no afm-train run; "
            "choose another --output"
        )
    try:
        old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
        raise CliError(f"{str(saved)!r} is unreadable; choose another --output") from None
    ident_new = json.loads(json.dumps(cfg.identity()))
    ident_old = {k: v for k, v in old.items() if k in ident_new}
    for sec in ("train", "data"):
        if isinstance(ident_old.get(sec), dict):
            ident_old[sec] = {k: v for k, v in ident_old[sec].items() if k in ident_new[sec]}
    diff = _diff_keys(ident_old, ident_new)
    if diff:
        raise CliError(
            f"output directory {str(out)!r} holds a different run (differs in "
            f"{', '.join(diff[:5])}); choose another --output or delete it"
        )
    return True


def _write_config(cfg: Any) -> None:
    import yaml

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    (out / "run_config.json").write_text(json.dumps(d, indent=2))
    (out / "run_config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def run(cfg: Any, *, progress: bool = True) -> int:
    import torch

    import afm  # noqa: F401  (registers the afm quantizer)
    from afm.data import DataError, generate_synthetic_data, load_synthetic_data, pad_collate
    from afm.distill import _Order, distill, make_accelerator, make_student, save_student
    from afm.models import load_model, load_tokenizer, resolve_model

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    resuming = check_output_dir(cfg)
    out = Path(cfg.output)
    if (out / "train_summary.json").exists():
        summary = json.loads((out / "train_summary.json").read_text())
        print(f"{PROG}: {out} already holds this finished run; nothing to do")
        if summary.get("table"):
            print(summary["table"])
        return 0
    data_dir = cfg.resolved_data_dir
    if not cfg.generate:
        load_synthetic_data(data_dir)  # DataError when missing / empty / incomplete
    acc = make_accelerator(cfg.train)
    teacher = load_model(cfg.model, dtype=torch.float32)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if acc.is_main_process:
        _write_config(cfg)
    acc.wait_for_everyone()
    teacher.to(acc.device)
    resolved_name = resolve_model(cfg.model)
    if cfg.generate:
        stats = generate_synthetic_data(
            teacher,
            tokenizer,
            data_dir,
            cfg.data,
            model_name=cfg.model,
            rank=acc.process_index,
            world_size=acc.num_processes,
            progress=progress and acc.is_local_main_process,
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            print(
                f"{PROG}: synthetic data {data_dir}: {stats['tokens']} tokens in "
                f"{stats['sequences']} sequences (generated {stats['generated']} shards"
                f"{', resumed' if resuming else ''})"
            )
    dataset = load_synthetic_data(data_dir)
    if len(dataset) == 0:
        raise DataError(f"data directory {str(data_dir)!r} is empty")
    student = make_student(teacher, cfg.student_chip())
    result = distill(
        teacher,
        student,
        dataset,
        cfg.train,
        out,
        pad_id=pad_id,
        accelerator=acc,
        resume=True,
        progress=progress,
    )
    student = result.model  # whole on the main process, also under FSDP / ZeRO-3
    if acc.is_main_process:
        save_student(student, out)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    train_s = time.perf_counter() - t_start
    table = None
    evaluation = None
    if acc.is_main_process and cfg.eval.enabled:
        from afm.train_report import before_after, format_table, has_bundled_tasks

        if has_bundled_tasks(resolved_name):
            order = _Order(dataset, cfg.train.per_device_batch_size, 1, 1, cfg.train.seed)
            calib = [
                pad_collate(order.rows(i), pad_id)
                for i in order.calibration(cfg.eval.calibration_batches)
            ]
            evaluation = before_after(
                teacher,
                student,
                tokenizer,
                calib,
                preset=cfg.eval_chip(),
                chip_name=cfg.eval_chip_name,
                noise=cfg.eval_noise(),
                seeds=cfg.eval.seeds,
                n_per_kind=cfg.eval.n_per_kind,
                facts=cfg.eval.facts,
                curve_scales=cfg.eval.curve_scales,
            )
            table = format_table(evaluation)
            (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
            print(table)
        else:
            print(f"{PROG}: {cfg.model} has no bundled tasks; skipping the before/after table")
    if acc.is_main_process:
        summary = {
            "steps": result.steps,
            "skipped_steps": result.skipped_steps,
            "resumed_from": result.resumed_from,
            "final_loss": result.final_loss,
            "seconds_to_trained": round(train_s, 1),
            "seconds_total": round(time.perf_counter() - t_start, 1),
            "table": table,
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"{PROG}: saved the analog model to {out} ({result.steps} steps, "
            f"{result.skipped_steps} skipped, {summary['seconds_total']:.0f} s)"
        )
    acc.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.quiet)

    def go() -> int:
        from afm.train_config import build_run_config

        cfg = build_run_config(
            args.model, args.output, preset=args.preset, config_file=args.config, sets=args.set
        )
        return run(
            cfg,
            progress=not args.quiet and sys.stderr.isatty() or bool(os.environ.get("AFM_PROGRESS")),
        )

    return run_cli(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
