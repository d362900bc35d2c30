"""``afm-train``: synthetic data from the teacher, distillation into an analog student.

    afm-train --model tiny --output runs/tiny
    afm-train --model phi-3-mini --config configs/train/phi3-mini-paper.yaml --output runs/phi3
    accelerate launch --config_file configs/accelerate/ddp-8gpu.yaml -m afm.cli.train ...

Every option of the run is a key of the YAML (``--config``) and can be set with
``--set key=value`` (e.g. ``--set train.lr=1e-4 --set data.num_tokens=1e6``).
The output directory receives the final model (loads with
``AutoModelForCausalLM.from_pretrained`` after ``import afm``), its tokenizer,
``run_config.json`` / ``run_config.yaml`` (the resolved config), ``data/`` (the
synthetic shards), ``checkpoints/``, ``log.jsonl`` and ``eval.json``.

Running the same command again resumes an interrupted run (from the newest intact
checkpoint) and does nothing for a finished one, unless ``eval.*`` changed: then the
saved student is evaluated again; with a raised ``train.max_steps`` it
extends a finished run from its last checkpoint.  A directory that holds a different
run, or is in use by a running afm-train, is refused.  Everything is checked before
anything is written: bad input is one line ``afm-train: error: ...`` and exit status
2.  Training that diverges (``train.max_consecutive_skips`` skipped steps in a row)
stops with exit status 1 and saves nothing; a non-finite model is never saved.

``--model`` may be an afm (analog) checkpoint: the teacher is then its digital
weights (``afm.revert``) — the teacher of a distillation is always digital — and the
student is a fresh copy on the chip of ``--preset`` (default afm-paper) with input
ranges calibrated anew; the checkpoint's old chip is not kept.

Your own corpus instead of (or mixed with) teacher-generated data:
``--set corpus.path=my.jsonl`` (``corpus.mix=0.5`` for half and half).
Progress: ``--progress auto`` (default) draws a bar on a TTY and logs a line every
``train.logging_steps`` steps elsewhere (nohup, Slurm, CI); ``bar``, ``log``, ``none``.
"""

from __future__ import annotations

import argparse
import sys

from afm.cli.common import cli_main, make_parser, setup_logging
from afm.training.progress import PROGRESS_MODES

PROG = "afm-train"


def _parser():  # noqa: ANN202
    p = make_parser(PROG, __doc__)
    p.add_argument("--model", help="alias (tiny, phi-3-mini, ...), local directory or hub id")
    p.add_argument(
        "--preset",
        help="hardware preset of the student (default afm-paper); also for an analog "
        "--model, whose old chip is replaced",
    )
    p.add_argument("--config", help="run YAML (keys: model, preset, data.*, train.*, eval.*)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key"
    )
    p.add_argument("--output", help="output directory")
    p.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="auto: a bar on a TTY, else a log line every train.logging_steps; bar; log; none",
    )
    p.add_argument("--quiet", action="store_true", help="warnings only (implies --progress none)")
    return p


def _run(args: argparse.Namespace) -> int:
    from afm.training.run import run_training
    from afm.training.run_config import build_run_config

    setup_logging(args.quiet)
    cfg = build_run_config(
        args.model, args.output, preset=args.preset, config_file=args.config, sets=args.set
    )
    outcome = run_training(cfg, progress="none" if args.quiet else args.progress)
    summary = outcome.summary
    if not outcome.main_process:
        return 0
    if outcome.reevaluated:
        print(f"{PROG}: {outcome.output} holds this finished run; evaluated it again")
    elif outcome.already_finished:
        print(f"{PROG}: {outcome.output} already holds this finished run; nothing to do")
    if summary.get("table"):
        print(summary["table"])
    if not outcome.already_finished:
        print(
            f"{PROG}: saved the analog model to {outcome.output} ({summary['steps']} steps, "
            f"{summary['skipped_steps']} skipped, {summary['seconds_total']:.0f} s)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(main())
