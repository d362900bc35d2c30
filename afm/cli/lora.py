"""``afm-lora``: train a digital LoRA adapter on a frozen analog base (AHWA-LoRA).

    afm-lora --base tiny --task mul --output runs/mul-adapter
    afm-lora --base ./my-afm-checkpoint --task data.jsonl --output out --r 16 --steps 500
    afm-lora --mode sft --base tiny --task chat.jsonl --chat-template chat.jinja --output sft
    afm-lora --mode grpo --base tiny --task arith --init-adapter sft --output grpo \
             --reward exact-match --reward mypkg.rewards:brevity

``--base``: an afm checkpoint directory (keeps its own hardware model and input
ranges) or a plain HF model / directory / afm alias, converted with ``--preset``
and calibrated on the task's training texts.  ``--task``: a bundled toy-world task
(``mul``, ``facts-new``, ``arith``; see ``afm.toyworld.lora_tasks``) or a JSONL file with
``{"prompt": ..., "completion": ...}`` per line (the LM loss is on the completion
only).  The adapter alone is saved to ``--output`` (peft ``adapter_model.safetensors``
+ ``adapter_config.json``) with ``afm_lora.json`` (settings and results), once training
and evaluation are done; ``--output`` must be new or empty (``--overwrite`` replaces a
previous afm-lora adapter there) and is checked before anything is loaded.  Then the
base alone and base + adapter are evaluated without deployment noise and under the
deployment noise model (``--noise``, one programmed chip per seed; ``pcm-drift`` at
each ``--drift-times``), mean ± std over seeds.  Load the adapter again with
``afm.lora.load_adapter(base, DIR)``.

``--mode``: ``supervised`` (default: afm's own loop on prompt/completion pairs),
``sft`` (TRL's SFTTrainer: prompt/completion, conversational ``messages`` with a chat
template, or ``text`` data from a bundled task, a .jsonl/.json/.csv/.parquet file, a
``save_to_disk`` directory or a hub dataset) or ``grpo`` (TRL's GRPOTrainer: a
``prompt`` column, rewards by name or import path, rollouts on the noisy chip).  The
TRL modes also write afm-eval reports (``<mode>-eval``, ``<mode>-curves``) to
``--eval-out`` (default ``--output``).  The pipeline is
``afm.lora.trl_experiment.run_lora_mode``.
"""

from __future__ import annotations

import argparse
import logging

from afm.cli.common import cli_main, make_parser

PROG = "afm-lora"


def _parser() -> argparse.ArgumentParser:
    ap = make_parser(PROG, __doc__.split("\n\n")[0], epilog="See docs/lora.md.")
    ap.add_argument(
        "--mode",
        default="supervised",
        choices=("supervised", "sft", "grpo"),
        help="supervised (afm's loop), sft (TRL SFTTrainer) or grpo (TRL GRPOTrainer)",
    )
    ap.add_argument("--base", required=True, help="afm checkpoint dir, HF model dir/id or alias")
    ap.add_argument("--preset", default="ahwa-lora", help="hardware preset for a plain base")
    ap.add_argument("--task", required=True, help="bundled task name or a .jsonl file")
    ap.add_argument("--output", required=True, help="directory for the adapter (new or empty)")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an afm-lora adapter already in --output (other files are refused)",
    )
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--alpha", type=float, default=32, help="lora_alpha (default 32)")
    ap.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="module names to adapt (default: every analog layer but the output head)",
    )
    ap.add_argument(
        "--modules-to-save",
        nargs="+",
        default=None,
        help="digital modules trained and saved alongside (e.g. norm)",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-train-noise",
        action="store_true",
        help="train with the analog layers in eval mode (no hardware noise)",
    )
    ap.add_argument(
        "--calib-steps",
        type=int,
        default=20,
        help="input-range calibration batches for a plain base",
    )
    ap.add_argument(
        "--noise",
        default=None,
        help="deployment noise model: pcm, gaussian, pcm-drift or none (default: the "
        "preset's evaluation noise; ahwa-lora: aihwkit-mode pcm-drift)",
    )
    ap.add_argument(
        "--noise-scale", type=float, default=1.0, help="multiplier of the deployment noise"
    )
    ap.add_argument(
        "--drift-times",
        default=None,
        help="evaluation times for pcm-drift, comma separated (default: the preset's; "
        "ahwa-lora: 0s,1h,1d,1w,1mo,1y,10y)",
    )
    ap.add_argument(
        "--noise-seeds",
        type=int,
        default=None,
        help="programmed chips per condition (default: the preset's; ahwa-lora: 10)",
    )
    ap.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test items")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a busy shared CPU)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    trl = ap.add_argument_group("--mode sft / grpo (TRL)")
    trl.add_argument(
        "--init-adapter", default=None, help="continue training this saved adapter (e.g. SFT)"
    )
    trl.add_argument("--eval-out", default=None, help="directory of the afm-eval reports")
    trl.add_argument("--eval-every", type=int, default=0, help="curve point every N steps")
    trl.add_argument("--curve-seeds", type=int, default=None, help="chips per curve point")
    trl.add_argument("--curve-n", type=int, default=None, help="test items per curve point")
    trl.add_argument("--chat-template", default=None, help="sft: Jinja chat template file")
    trl.add_argument("--max-length", type=int, default=1024, help="sft: max tokens per row")
    trl.add_argument(
        "--reward",
        action="append",
        default=None,
        help="grpo: exact-match, pkg.module:function or file.py:function (repeatable)",
    )
    trl.add_argument("--num-generations", type=int, default=8, help="grpo: rollouts per prompt")
    trl.add_argument("--max-completion-length", type=int, default=64, help="grpo")
    trl.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling")
    trl.add_argument("--beta", type=float, default=0.0, help="grpo: KL coefficient")
    return ap


def _run(args: argparse.Namespace) -> int:
    from afm.lora.experiment import format_lora_table
    from afm.lora.model import TrainableReport
    from afm.lora.trl_experiment import run_lora_mode

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    meta = run_lora_mode(vars(args))
    report = TrainableReport(meta["trainable"], meta["total"], meta["trainable_pct"])
    print(f"{PROG}: {report}")
    print(
        f"{PROG}: adapter saved to {args.output} (final train loss {meta['final_train_loss']:.4f})"
    )
    print()
    print(format_lora_table(meta, meta["noise_seeds"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _parser(), argv, _run)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
