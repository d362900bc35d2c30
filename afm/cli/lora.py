"""``afm-lora``: train a digital LoRA adapter on a frozen analog base (AHWA-LoRA).

    afm-lora --base tiny --task mul --output runs/mul-adapter
    afm-lora --base ./my-afm-checkpoint --task data.jsonl --output out --r 16 --steps 500

``--base``: an afm checkpoint directory (keeps its own hardware model and input
ranges) or a plain HF model / directory / afm alias, converted with ``--preset``
and calibrated on the task's training texts.  ``--task``: a bundled toy-world task
(``mul``, ``facts-new``, ``arith``; see ``afm.lora_tasks``) or a JSONL file with
``{"prompt": ..., "completion": ...}`` per line (the LM loss is on the completion
only).  The adapter alone is saved to ``--output`` (peft ``adapter_model.safetensors``
+ ``adapter_config.json``) with ``afm_lora.json`` (settings and results).  Then the
base alone and base + adapter are evaluated without deployment noise and under the
deployment noise model (``--noise``, one programmed chip per seed; ``pcm-drift`` at
each ``--drift-times``), mean ± std over seeds.  Load the adapter again with
``afm.lora.load_adapter(base, DIR)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="afm-lora",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See docs/lora.md.",
    )
    ap.add_argument("--base", required=True, help="afm checkpoint dir, HF model dir/id or alias")
    ap.add_argument("--preset", default="ahwa-lora", help="hardware preset for a plain base")
    ap.add_argument("--task", required=True, help="bundled task name or a .jsonl file")
    ap.add_argument("--output", required=True, help="directory for the adapter")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--alpha", type=float, default=32, help="lora_alpha (default 32)")
    ap.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="module names to adapt (default: every analog layer)",
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
        "--noise", default="pcm", help="deployment noise model: pcm, gaussian, pcm-drift or none"
    )
    ap.add_argument(
        "--noise-scale", type=float, default=1.0, help="multiplier of the deployment noise"
    )
    ap.add_argument(
        "--drift-times",
        default="0s,1h,1d,1y",
        help="evaluation times for pcm-drift (comma separated)",
    )
    ap.add_argument("--noise-seeds", type=int, default=3, help="programmed chips per condition")
    ap.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test items")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a busy shared CPU)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _fail(msg: str) -> int:
    print(f"afm-lora: error: {msg}", file=sys.stderr)
    return 2


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    # ---- validate everything cheap before loading anything
    if args.r < 1:
        return _fail(f"--r {args.r} is invalid: the LoRA rank must be >= 1")
    if not args.alpha > 0:
        return _fail(f"--alpha {args.alpha} is invalid: must be > 0")
    if args.steps < 1:
        return _fail(f"--steps {args.steps} is invalid: must be >= 1")
    if not args.lr > 0:
        return _fail(f"--lr {args.lr} is invalid: must be > 0")
    if args.batch_size < 1:
        return _fail(f"--batch-size {args.batch_size} is invalid: must be >= 1")
    if args.noise_seeds < 1:
        return _fail(f"--noise-seeds {args.noise_seeds} is invalid: must be >= 1")
    if importlib.util.find_spec("peft") is None:
        return _fail("afm-lora needs peft: pip install 'afm[peft]'")

    from afm import lora_tasks

    task_path = Path(args.task)
    task: Any = None
    if args.task in lora_tasks.TASKS:
        task = lora_tasks.get_task(args.task)
    elif task_path.suffix == ".jsonl" and task_path.is_file():
        try:
            pairs = lora_tasks.examples_from_jsonl(task_path.read_text().splitlines())
        except ValueError as err:
            return _fail(f"--task {args.task}: {err}")
    else:
        return _fail(
            f"unknown task {args.task!r}: use a bundled task ({', '.join(lora_tasks.TASKS)}) "
            "or an existing .jsonl file of prompt/completion pairs"
        )

    from afm.models import resolve_model

    resolved = resolve_model(args.base)
    looks_local = resolved.startswith(("/", ".", "~")) or Path(resolved).exists()
    if looks_local and not (Path(resolved).expanduser() / "config.json").is_file():
        return _fail(f"base model {args.base!r} not found (no config.json in {resolved})")

    noise_models: list[tuple[str, Any]] = [("no noise", None)]
    if args.noise != "none":
        if importlib.util.find_spec("afm.noise") is None:
            print("afm-lora: afm.noise is not available; evaluating without deployment noise")
        else:
            from afm import noise as afm_noise

            try:
                if args.noise == "pcm-drift":
                    for t in args.drift_times.split(","):
                        secs = afm_noise.parse_duration(t.strip())
                        nm = afm_noise.get_noise_model(
                            "pcm-drift", t_inference=secs, scale=args.noise_scale
                        )
                        noise_models.append((f"pcm-drift t={t.strip()}", nm))
                else:
                    nm = afm_noise.get_noise_model(args.noise, scale=args.noise_scale)
                    noise_models.append((nm.label, nm))
            except ValueError as err:
                return _fail(str(err))

    # ---- load (the expensive part)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import torch

    import afm.lora as L

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from afm.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(resolved)
    except Exception as err:  # noqa: BLE001 - one clear line for any loading failure
        return _fail(f"cannot load the tokenizer of {args.base!r}: {str(err).splitlines()[0]}")
    if task is not None:
        train_pairs = task.train_examples(args.seed)
        calib = task.calibration_texts()
        eval_pairs = None
    else:
        import hashlib

        def held_out(p: tuple[str, str]) -> bool:
            return hashlib.blake2b("".join(p).encode(), digest_size=2).digest()[0] < 26

        eval_pairs = [p for p in pairs if held_out(p)] or pairs[:1]
        train_pairs = [p for p in pairs if not held_out(p)] or pairs
        calib = [p + c for p, c in train_pairs[:128]]
    try:
        base = L.load_analog_base(
            resolved,
            preset=args.preset,
            calibration_texts=calib,
            tokenizer=tokenizer,
            calibration_steps=args.calib_steps,
        )
    except Exception as err:  # noqa: BLE001
        return _fail(f"cannot load base model {args.base!r}: {str(err).splitlines()[0]}")
    base.to(args.device)

    try:
        peft_model = L.attach_lora(
            base,
            r=args.r,
            alpha=args.alpha,
            targets=args.targets,
            modules_to_save=args.modules_to_save,
            seed=args.seed,
        )
    except ValueError as err:
        return _fail(str(err).splitlines()[0])
    report = L.trainable_report(peft_model)
    print(f"afm-lora: {report}")

    result = L.train_adapter(
        peft_model,
        tokenizer,
        train_pairs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        noise=not args.no_train_noise,
        progress=not args.quiet,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    print(f"afm-lora: adapter saved to {out} (final train loss {result.final_loss:.4f})")

    # ---- evaluate base vs base + adapter
    if task is not None:
        metric = task.metric

        def evaluate(m: Any) -> float:
            return task.evaluate(m, tokenizer, args.eval_n)
    else:
        metric = "completion NLL (lower is better)"

        def evaluate(m: Any) -> float:
            return L.completion_loss(m, tokenizer, eval_pairs)

    seeds = list(range(args.noise_seeds))
    rows = []
    with torch.no_grad():  # scoped: main() is also called in-process (tests, notebooks)
        for label, nm in noise_models:
            with peft_model.disable_adapter():
                base_vals = L.evaluate_under_noise(peft_model, evaluate, nm, seeds)
            ad_vals = L.evaluate_under_noise(peft_model, evaluate, nm, seeds)
            rows.append({"condition": label, "base": base_vals, "base+adapter": ad_vals})
    print(f"\n{metric} on task {args.task!r} ({len(seeds)} noise seeds per noisy condition)")
    print(f"{'condition':<28} {'base':>16} {'base+adapter':>16}")
    for row in rows:
        cells = []
        for key in ("base", "base+adapter"):
            m, s = _mean_std(row[key])
            cells.append(f"{m:.3f} ± {s:.3f}" if len(row[key]) > 1 else f"{m:.3f}")
        print(f"{row['condition']:<28} {cells[0]:>16} {cells[1]:>16}")

    meta = {
        "base": args.base,
        "preset": args.preset,
        "task": args.task,
        "r": args.r,
        "alpha": args.alpha,
        "targets": args.targets,
        "modules_to_save": args.modules_to_save,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "train_noise": not args.no_train_noise,
        "trainable": report.trainable,
        "total": report.total,
        "trainable_pct": report.pct,
        "final_train_loss": result.final_loss,
        "metric": metric,
        "results": rows,
    }
    (out / "afm_lora.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
