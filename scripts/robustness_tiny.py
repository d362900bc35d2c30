#!/usr/bin/env python
"""Robustness curve of the tiny teacher: accuracy vs PCM noise scale and vs I/O bits.

    python scripts/robustness_tiny.py                 # writes afm/assets/tiny/robustness.{json,png}
    python scripts/robustness_tiny.py --no-card       # do not touch the model card

Every condition converts all linear layers except the LM head to ``AnalogLinear``
(static input ranges calibrated on training-split text, ``input bits`` DAC and
``output bits`` ADC with ``bound``), programs the weights with AFM PCM programming
noise (spec §5a) scaled by ``scale`` (``afm.analog.noise.PCMProgrammingNoise``), and measures
the toy world's test-split accuracies (``afm.toyworld.evaluate_arith`` /
``evaluate_facts``), mean ± std over ``--seeds`` noise seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import afm
from afm import toyworld as tw
from afm.analog.noise import PCMProgrammingNoise, apply_noise_
from afm.models import load_model, load_tokenizer, resolve_model

MARK_BEGIN, MARK_END = "<!-- robustness -->", "<!-- /robustness -->"


def chip(
    input_bits: int | None, output_bits: int | None, bound: float | None, alpha: float
) -> afm.AnalogConfig:
    """The evaluation chip: afm-paper's I/O model without training-time noise or clipping."""
    base = afm.get_preset("afm-paper")
    return dataclasses.replace(
        base,
        input=dataclasses.replace(base.input, bits=input_bits, init_std_alpha=alpha),
        output=dataclasses.replace(base.output, bits=output_bits, bound=bound),
        weight_noise=afm.WeightNoiseConfig(),
        output_noise=afm.OutputNoiseConfig(),
        clip=afm.ClipConfig(afm.ClipKind.NONE),
    )


def calib_batches(tok, n: int, rows: int = 8, seq: int = 128) -> list[dict]:
    """``n`` batches of packed training-split rows (BOS + newline-separated documents)."""
    docs = tw.training_documents(tw.ToyWorldConfig(seed=123))
    nl = tok.convert_tokens_to_ids("Ċ")
    ids: list[int] = []
    for d in tok([next(docs) for _ in range(n * rows * 6)], add_special_tokens=False).input_ids:
        ids += d + [nl]
    step = seq - 1
    chunks = [[tok.bos_token_id] + ids[k * step : (k + 1) * step] for k in range(n * rows)]
    return [{"input_ids": torch.tensor(chunks[b * rows : (b + 1) * rows])} for b in range(n)]


def measure(model, tok, probs, questions) -> dict:
    acc, outs = tw.evaluate_arith(model, tok, probs, batch_size=len(probs), return_outputs=True)
    res = {"arith": acc}
    for d in sorted({p.n_digits for p in probs}):
        sel = [(p, o) for p, o in zip(probs, outs, strict=True) if p.n_digits == d]
        res[f"arith_{d}d"] = sum(tw.parse_answer(o) == p.answer for p, o in sel) / len(sel)
    res["facts"] = tw.evaluate_facts(model, tok, questions, batch_size=192)
    return res


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for k in per_seed[0]:
        v = [r[k] for r in per_seed]
        out[k] = {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default=None, help="output dir (default: the model dir)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--scales", default="1,2,3,4,6", help="PCM noise scales at 8/8 bits")
    ap.add_argument("--bits", default="7,6,5", help="I/O bits swept at PCM scale --bits-scale")
    ap.add_argument("--bits-scale", type=float, default=1.0)
    ap.add_argument(
        "--stress",
        default="",
        help="';'-separated tiny-stress candidates in_bits,out_bits,bound,pcm_scale",
    )
    ap.add_argument("--bound", type=float, default=14.0)
    ap.add_argument("--alpha", type=float, default=18.0, help="input range = alpha * std")
    ap.add_argument("--n-arith", type=int, default=48, help="test problems (even over 6 kinds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-card", action="store_true")
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into an existing robustness.json (same condition -> replaced)",
    )
    ap.add_argument(
        "--propose",
        default="8,8,14,3",
        help="the condition named as the tiny-stress proposal in the card ('' = none)",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="re-draw the PNG and the card from an existing robustness.json",
    )
    args = ap.parse_args(argv)

    if args.render_only:
        out_dir = Path(args.out or resolve_model(args.model))
        results = json.loads((out_dir / "robustness.json").read_text())
        results["proposed"] = args.propose
        (out_dir / "robustness.json").write_text(json.dumps(results, indent=1))
        plot(results, out_dir / "robustness.png")
        if not args.no_card:
            update_card(out_dir / "README.md", results)
        return

    t0 = time.time()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out or resolve_model(args.model))
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    probs = tw.arith_problems("test", args.n_arith, seed=0)
    questions = tw.fact_questions("test")

    results: dict = {"model": args.model, "args": vars(args), "conditions": []}
    results["fp"] = measure(model, tok, probs, questions)
    print("FP", results["fp"], flush=True)

    conds = [(8, 8, args.bound, 0.0)] if not args.append else []
    conds += [(8, 8, args.bound, float(x)) for x in args.scales.split(",") if x]
    conds += [(int(b), int(b), args.bound, args.bits_scale) for b in args.bits.split(",") if b]
    for cand in filter(None, args.stress.split(";")):
        i, o, bd, x = cand.split(",")
        conds.append((int(i), int(o), float(bd), float(x)))
    batches = calib_batches(tok, 8)
    for in_b, out_b, bound, scale in conds:
        afm.revert(model)
        afm.convert(model, chip(in_b, out_b, bound, args.alpha))
        afm.calibrate_input_ranges_(model, batches, max_steps=len(batches), progress=False)
        model.eval()
        tile = afm.analog_layers(model)[next(iter(afm.analog_layers(model)))].analog_config
        noise = PCMProgrammingNoise(scale=scale, tile_size=tile.max_input_size)
        per_seed = []
        for seed in range(args.seeds if scale > 0 else 1):
            handle = apply_noise_(model, noise, seed, only_analog=True) if scale > 0 else None
            per_seed.append(measure(model, tok, probs, questions))
            if handle is not None:
                handle.restore()
        c = {
            "input_bits": in_b,
            "output_bits": out_b,
            "bound": bound,
            "pcm_scale": scale,
            "alpha": args.alpha,
            "n_seeds": len(per_seed),
            "per_seed": per_seed,
            **summarise(per_seed),
        }
        results["conditions"].append(c)
        print(
            f"in{in_b} out{out_b} bound{bound} pcm×{scale}: "
            f"arith {c['arith']['mean']:.3f}±{c['arith']['std']:.3f} "
            f"facts {c['facts']['mean']:.3f}±{c['facts']['std']:.3f} "
            f"[{time.time() - t0:.0f}s]",
            flush=True,
        )
    afm.revert(model)
    results["wall_s"] = round(time.time() - t0, 1)
    results["proposed"] = args.propose
    out_dir.mkdir(parents=True, exist_ok=True)
    old_path = out_dir / "robustness.json"
    if args.append and old_path.exists():
        old = json.loads(old_path.read_text())
        key = ("input_bits", "output_bits", "bound", "pcm_scale")
        new_keys = {tuple(c[k] for k in key) for c in results["conditions"]}
        kept = [c for c in old["conditions"] if tuple(c[k] for k in key) not in new_keys]
        results["conditions"] = kept + results["conditions"]
        results["args"] = old["args"] | {"stress": args.stress}
    (out_dir / "robustness.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "robustness.png")
    if not args.no_card and (out_dir / "README.md").exists():
        update_card(out_dir / "README.md", results)
    print(f"done in {results['wall_s']:.0f} s -> {out_dir}", flush=True)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    conds = results["conditions"]
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8), dpi=80)
    c8 = sorted(
        (c for c in conds if c["input_bits"] == 8 and c["output_bits"] == 8),
        key=lambda c: c["pcm_scale"],
    )
    cb = sorted(
        (
            c
            for c in conds
            if c["pcm_scale"] == results["args"]["bits_scale"]
            and c["input_bits"] == c["output_bits"]
        ),
        key=lambda c: -c["input_bits"],
    )
    for key, m in (("arith", "o-"), ("facts", "s--")):
        axes[0].errorbar(
            [c["pcm_scale"] for c in c8],
            [100 * c[key]["mean"] for c in c8],
            [100 * c[key]["std"] for c in c8],
            fmt=m,
            label=key,
            capsize=2,
        )
        axes[1].errorbar(
            [c["input_bits"] for c in cb],
            [100 * c[key]["mean"] for c in cb],
            [100 * c[key]["std"] for c in cb],
            fmt=m,
            label=key,
            capsize=2,
        )
    axes[0].set(xlabel="PCM noise scale (8-bit I/O)", ylabel="accuracy %", ylim=(0, 102))
    axes[1].set(xlabel=f"I/O bits (PCM ×{results['args']['bits_scale']:g})", ylim=(0, 102))
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def update_card(card: Path, results: dict) -> None:
    fp = results["fp"]
    hard = max(int(k[6:-1]) for k in fp if k.startswith("arith_") and k.endswith("d"))
    hk = f"arith_{hard}d"
    lines = [
        MARK_BEGIN,
        "## Robustness (measured by `scripts/robustness_tiny.py`)",
        "",
        "All linear layers except the LM head run as `afm.AnalogLinear` (static input "
        f"ranges at {results['args']['alpha']:g} σ, calibrated on training text), weights "
        "programmed with AFM PCM noise (spec §5a) times a scale; "
        f"mean ± std over {results['args']['seeds']} noise seeds, "
        f"{results['args']['n_arith']} arithmetic problems and "
        f"{len(tw.fact_questions('test'))} facts questions (test split).",
        "",
        f"| input bits | output bits | bound | PCM scale | arith % | {hard}-digit % | facts % |",
        "|---|---|---|---|---|---|---|",
        f"| FP | FP | – | 0 | {100 * fp['arith']:.1f} | {100 * fp[hk]:.1f} "
        f"| {100 * fp['facts']:.1f} |",
    ]
    order = sorted(
        results["conditions"],
        key=lambda c: (-c["input_bits"], -c["output_bits"], c["pcm_scale"]),
    )
    for c in order:
        lines.append(
            f"| {c['input_bits']} | {c['output_bits']} | {c['bound']:g} | {c['pcm_scale']:g} "
            f"| {100 * c['arith']['mean']:.1f} ± {100 * c['arith']['std']:.1f} "
            f"| {100 * c[hk]['mean']:.1f} ± {100 * c[hk]['std']:.1f} "
            f"| {100 * c['facts']['mean']:.1f} ± {100 * c['facts']['std']:.1f} |"
        )
    if results.get("proposed"):
        i, o, bd, x = results["proposed"].split(",")
        match = [
            c
            for c in results["conditions"]
            if (c["input_bits"], c["output_bits"], c["bound"], c["pcm_scale"])
            == (int(i), int(o), float(bd), float(x))
        ]
        if match:
            c = match[0]
            drops = {k: 100 * (fp[k] - c[k]["mean"]) for k in ("arith", "facts")}
            lines += [
                "",
                f"Proposed `tiny-stress` chip: {i}-bit inputs, {o}-bit outputs, bound {bd}, "
                f"PCM programming noise ×{x}: the FP teacher ({100 * fp['arith']:.1f} % arith "
                f"clean) loses {drops['arith']:.1f} points on arithmetic and "
                f"{drops['facts']:.1f} on facts (mean over {c['n_seeds']} seeds).",
            ]
    lines += [
        "",
        "The noise-free row (PCM scale 0) is a single deterministic draw; with 48 problems "
        "one problem is 2 points, so rows within ~5 points are not distinguishable.",
        "",
        "![robustness](robustness.png)",
        "",
        "Why a harsher chip than for an LLM: a 3.5 M-parameter model trained to "
        "saturation on a tiny, regular world has large logit margins and redundant "
        "features, so it shrugs off the 8-bit / PCM ×1 condition that costs "
        "billion-parameter LLMs 8–10 points; the tiny demos therefore amplify the PCM "
        "programming noise ×3 (`tiny-stress`) to leave afm something to recover.",
        "",
        MARK_END,
    ]
    text = card.read_text()
    if MARK_BEGIN in text:
        head, _, rest = text.partition(MARK_BEGIN)
        tail = rest.partition(MARK_END)[2]
        text = head + "\n".join(lines) + tail
    else:
        text += "\n" + "\n".join(lines) + "\n"
    card.write_text(text)


if __name__ == "__main__":
    main()
