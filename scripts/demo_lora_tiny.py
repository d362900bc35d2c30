#!/usr/bin/env python
"""AHWA-LoRA demonstration on the embedded tiny teacher (CPU, ~10 min on 2 cores).

    python scripts/demo_lora_tiny.py --out runs/demo_lora_tiny.json

1. The tiny teacher (``afm/assets/tiny``) is converted with the ``ahwa-lora`` preset
   (the AHWA-LoRA code's chip: dynamic 8-bit inputs, 8-bit ADC with iterative bound
   management, output noise also at inference, every linear layer analog, the head
   included) and frozen: the analog meta-weights are programmed once.
2. Three digital LoRA adapters are trained on this one base (rank ``--r`` on every
   analog layer, <= 5 % trainable parameters each; ``--task-a`` / ``--task-b`` pick
   other bundled tasks from ``afm.toyworld.lora_tasks``):
   ``mul``        new operation (2-digit x 1-digit multiplication), trained under the
                  ``ahwa-lora`` hardware noise (analog layers in train mode);
   ``mul_noisefree`` the same task, same init and data, trained without noise (analog
                  layers in eval mode: quantization only);
   ``facts-new``  a new set of facts (24 unseen entities), trained under noise.
3. Each is evaluated on its task's test split without deployment noise and under
   deployment noise (``--noise``; default ``preset``: the ahwa-lora protocol, aihwkit's
   PCM model with drift and per-tile drift compensation at ``--drift-times``; or e.g.
   ``pcm`` at ``--noise-scales`` times its sigma),
   one programmed chip per seed, mean ± std over ``--seeds`` seeds; the base alone
   with ``disable_adapter()``.  Adapters are swapped with ``set_adapter`` on the same
   base, and the base is checked to be bitwise unchanged at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="tiny", help="the teacher (alias or directory)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--task-a", default="mul", help="main task (noisy vs clean adapter)")
    ap.add_argument("--task-b", default="facts-new", help="second task (adapter swap)")
    ap.add_argument("--steps", type=int, default=800, help="training steps per task-a adapter")
    ap.add_argument("--steps-b", type=int, default=200, help="training steps of the task-b one")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--noise",
        default="preset",
        help="deployment noise model (afm.analog.noise); 'preset': ahwa-lora's (pcm-drift, "
        "mode aihwkit)",
    )
    ap.add_argument(
        "--drift-times", default="0s,1h,1y,10y", help="drift times of a pcm-drift noise"
    )
    ap.add_argument(
        "--noise-scales", default="1", help="deployment noise multipliers (comma separated)"
    )
    ap.add_argument("--seeds", type=int, default=5, help="deployment-noise seeds (chips)")
    ap.add_argument("--n-eval", type=int, default=None, help="test items per task (all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--save-adapters", default=None, help="save the three adapters here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    import afm
    import afm.lora as L
    from afm import toyworld as tw
    from afm.analog.noise import apply_noise_, format_duration, get_noise_model, parse_duration
    from afm.models import load_tokenizer, resolve_model
    from afm.presets import eval_noise_of
    from afm.toyworld import lora_tasks as T

    base_dir = resolve_model(args.base)
    if not (Path(base_dir) / "config.json").is_file():
        print(f"demo: the tiny teacher is not at {base_dir} (train it first)", file=sys.stderr)
        return 2
    tok = load_tokenizer(base_dir)
    calib = list(itertools.islice(tw.training_documents(), 160))
    model = L.load_analog_base(
        base_dir,
        preset="ahwa-lora",
        calibration_texts=calib,
        tokenizer=tok,
        calibration_steps=10,
    )
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(
        f"base: {base_dir} converted with ahwa-lora, {len(afm.analog_layers(model))} analog layers"
    )

    task_a, task_b = T.get_task(args.task_a), T.get_task(args.task_b)
    a, b = task_a.name, task_b.name

    # ---- three adapters on one frozen analog base
    pm = L.attach_lora(model, r=args.r, alpha=args.alpha, adapter_name=a, seed=args.seed)
    report = L.trainable_report(pm)
    print(f"adapter {a!r}: {report}")
    kw = dict(lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    timings = {}
    t = time.perf_counter()
    L.train_adapter(pm, tok, task_a.train_examples(args.seed), steps=args.steps, **kw)
    timings[f"train {a} (noise)"] = time.perf_counter() - t
    L.attach_lora(pm, r=args.r, alpha=args.alpha, adapter_name=f"{a}_noisefree", seed=args.seed)
    t = time.perf_counter()
    kw_clean = {**kw, "noise": False}
    L.train_adapter(pm, tok, task_a.train_examples(args.seed), steps=args.steps, **kw_clean)
    timings[f"train {a}-clean (no noise)"] = time.perf_counter() - t
    L.attach_lora(pm, r=args.r, alpha=args.alpha, adapter_name=b, seed=args.seed)
    t = time.perf_counter()
    L.train_adapter(pm, tok, task_b.train_examples(args.seed), steps=args.steps_b, **kw)
    timings[f"train {b} (noise)"] = time.perf_counter() - t

    if args.save_adapters:
        pm.save_pretrained(args.save_adapters)  # adapters only, one folder per name

    # ---- evaluation: one chip per seed, every variant on the same chip
    def eval_a() -> float:
        return task_a.evaluate(pm, tok, args.n_eval)

    def eval_b() -> float:
        return task_b.evaluate(pm, tok, args.n_eval)

    variants = [  # (row label, adapter or None for the base alone, task, evaluator)
        ("base alone", None, a, eval_a),
        (f"+ {a} adapter, trained without noise", f"{a}_noisefree", a, eval_a),
        (f"+ {a} adapter, trained under ahwa-lora noise", a, a, eval_a),
        ("base alone", None, b, eval_b),
        (f"+ {a} adapter (other task)", a, b, eval_b),
        (f"+ {b} adapter, trained under ahwa-lora noise", b, b, eval_b),
    ]
    spec = eval_noise_of("ahwa-lora") if args.noise == "preset" else {"name": args.noise}
    name = spec.pop("name")
    noise_models = []
    for x in args.noise_scales.split(","):
        nm = get_noise_model(name, **spec, scale=float(x))
        if hasattr(nm, "t_inference"):
            for t in args.drift_times.split(","):
                noise_models.append(dataclasses.replace(nm, t_inference=parse_duration(t)))
        else:
            noise_models.append(nm)

    def cond_label(nm) -> str:
        t = getattr(nm, "t_inference", None)
        return (
            nm.name
            + ("" if t is None else f" @ {format_duration(t)}")
            + (f" x{nm.scale:g}" if nm.scale != 1 else "")
        )

    conditions = [("no deployment noise", None, [None])] + [
        (cond_label(nm), nm, list(range(args.seeds))) for nm in noise_models
    ]
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    t = time.perf_counter()
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)  # the chip's eval-time output noise without a programmed chip
    for cond, noise_model, seeds in conditions:
        for seed in seeds:
            handle = apply_noise_(pm, noise_model, seed, only_analog=True) if noise_model else None
            try:
                for label, adapter, task, fn in variants:
                    if adapter is None:
                        with pm.disable_adapter():
                            acc = fn()
                    else:
                        pm.set_adapter(adapter)
                        acc = fn()
                    results.setdefault((task, label), {}).setdefault(cond, []).append(acc)
            finally:
                if handle is not None:
                    handle.restore()
    timings["evaluation"] = time.perf_counter() - t

    # the base, bitwise: the wrapped layers' parameters sit under ".base_layer"
    base_now = {
        k.replace(".base_layer", ""): v
        for k, v in pm.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    unchanged = base_now.keys() == base_state.keys() and all(
        torch.equal(base_now[k], v) for k, v in base_state.items()
    )

    # ---- table
    cond_names = [c[0] for c in conditions]
    lines = [
        f"| task | model | {' | '.join(cond_names)} |",
        "|---|---|" + "---|" * len(cond_names),
    ]
    for (task, label), per in results.items():
        cells = []
        for c in cond_names:
            xs = per[c]
            if len(xs) > 1:
                cells.append(f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}")
            else:
                cells.append(f"{100 * xs[0]:.1f}")
        lines.append(f"| {task} | {label} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    total = time.perf_counter() - t_start
    print()
    print(
        f"Accuracy (%) on the test splits; deployment noise: "
        f"{', '.join(cond_label(nm) for nm in noise_models)}, "
        f"{args.seeds} chips (mean ± std).\n{a}: {task_a.description}\n{b}: {task_b.description}"
    )
    print(table)
    print()
    print(
        f"trainable parameters per adapter: {report.trainable:,} of {report.total:,} "
        f"({report.pct:.2f} %); adapters swapped with set_adapter on one base; "
        f"base bitwise unchanged: {unchanged}"
    )
    print(
        "wall times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f", total {total:.0f} s (CPU time of this process {time.process_time():.0f} s)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": " ".join(
                        ["python", "scripts/demo_lora_tiny.py", *(argv or sys.argv[1:])]
                    ),
                    "args": vars(args),
                    "trainable": report._asdict(),
                    "base_unchanged": unchanged,
                    "deployment_noise": [nm.to_dict() for nm in noise_models],
                    "results": [
                        {"task": task, "model": label, **per}
                        for (task, label), per in results.items()
                    ],
                    "table": table,
                    "timings_s": timings,
                    "total_s": total,
                },
                indent=1,
            )
            + "\n"
        )
    return 0 if unchanged else 1


if __name__ == "__main__":
    raise SystemExit(main())
