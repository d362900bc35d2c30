"""``afm-plan``: which layers to put on the chip, and what the chip costs.

    # what each layer costs on the chip (analog alone / kept digital), 3 noise seeds
    afm-plan sensitivity --model tiny --preset tiny-stress --task toyworld_arith --out runs/plan
    # the layers to keep digital for at most 1 point below FP, verified on held-out data
    afm-plan place --model tiny --preset tiny-stress --task toyworld_arith --max-drop 1 \\
                   --out runs/plan
    # tiles, conversions, digital work, latency and energy per token (configs only)
    afm-plan cost --model tiny --model phi-3-mini --model llama-3.2-1b --chip hermes

``place`` writes ``placement.json``, an afm config that ``afm.convert``,
``afm-eval --model path=tiny,placement=runs/plan/placement.json`` and ``afm-train
--set placement=runs/plan/placement.json`` accept; when the held-out data miss the
budget it writes ``placement-unverified.json`` instead and exits with status 1.  Bad
input prints one line ``afm-plan: error: ...`` and exits with status 2.  The library
functions are ``afm.plan.command.run_sensitivity`` / ``run_placement`` / ``run_cost``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from afm.cli.common import cli_main, make_parser, setup_logging

PROG = "afm-plan"


def _sweep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, chip and data")
    g.add_argument("--model", default="tiny", help="the FP model: alias, directory or hub id")
    g.add_argument("--preset", default="afm-paper", help="chip preset (afm.PRESETS)")
    g.add_argument("--noise", help="deployment noise (default: the preset's; 'none': off)")
    g.add_argument("--noise-scale", type=float, help="noise scale (default: the preset's)")
    g.add_argument(
        "--head",
        choices=("analog", "digital"),
        help="output head: a unit like any layer, or always digital (default: the preset's)",
    )
    g.add_argument("--task", help="toyworld_arith, toyworld_facts or an lm-eval task")
    g.add_argument("--texts", help="a text set instead: 'toyworld' or a file (one per line)")
    g.add_argument("--metric", default="kl", choices=("kl", "ppl"), help="metric of --texts")
    g.add_argument("--units", default="layers", choices=("layers", "blocks"))
    g.add_argument("--seeds", type=int, default=3, help="noise seeds per measurement")
    g.add_argument("--limit", type=int, help="documents per half (selection / held-out)")
    g.add_argument("--calib", default="toyworld", help="calibration texts: toyworld or a file")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--out", default="runs/plan", help="output directory")
    g.add_argument("--quiet", action="store_true", help="no progress bars, no table")


def _parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{sensitivity,place,cost}")
    sens = sub.add_parser("sensitivity", help="per-layer cost of being analog")
    _sweep_args(sens)
    place = sub.add_parser("place", help="layers to keep digital for an accuracy budget")
    _sweep_args(place)
    b = place.add_argument_group("budget (one of)")
    b.add_argument("--budget", dest="budget_file", help="budget YAML (max_drop / max_kl ...)")
    b.add_argument("--max-drop", type=float, help="points below FP on --task")
    b.add_argument("--max-kl", type=float, help="KL to FP in nats per token (--metric kl)")
    b.add_argument("--max-ppl-increase", type=float, help="%% above FP perplexity")
    b.add_argument("--keep-digital", action="append", default=[], metavar="LAYER")
    b.add_argument("--keep-analog", action="append", default=[], metavar="LAYER")
    b.add_argument("--sensitivity", help="take the ranking from this sensitivity.json")
    b.add_argument("--verify-seeds", type=int, help="held-out noise seeds (default: --seeds)")
    cost = sub.add_parser("cost", help="tiles, conversions, latency and energy per token")
    cost.add_argument("--model", action="append", dest="models", help="repeatable")
    cost.add_argument("--chip", default="hermes", help="hermes, hermes-4phase, 3d-sim")
    cost.add_argument("--chip-file", help="YAML overriding chip fields (base: CHIP)")
    cost.add_argument("--placement", help="placement.json: its layers analog, the rest digital")
    cost.add_argument("--digital", action="append", default=[], metavar="PATTERN")
    cost.add_argument("--analog-head", action="store_true", help="the output head analog too")
    cost.add_argument("--context", type=int, help="cached tokens attended to (default 1024)")
    cost.add_argument("--lora-rank", type=int, default=0, help="digital LoRA adapters' rank")
    cost.add_argument("--lora-targets", help="comma-separated layer patterns (default: all)")
    cost.add_argument("--out", help="write cost.json and cost.md here")
    return p


def _run(args: argparse.Namespace, command: str) -> int:
    from afm.plan import command as plan

    if args.cmd == "cost":
        targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
        request = plan.CostRequest(
            models=tuple(args.models or ["tiny"]),
            chip=args.chip,
            chip_file=args.chip_file,
            placement=args.placement,
            digital=tuple(args.digital),
            context=args.context,
            lora_rank=args.lora_rank,
            lora_targets=targets,
            analog_head=args.analog_head,
            out=args.out,
            command=command,
        )
        _, markdown, paths = plan.run_cost(request)
        print(markdown)
        for kind, path in paths.items():
            print(f"wrote {kind}: {path}")
        return 0
    setup_logging(args.quiet)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    fields = {k: v for k, v in vars(args).items() if k not in ("cmd", "quiet")}
    fields.update(progress=not args.quiet, command=command)
    if args.cmd == "sensitivity":
        _, paths = plan.run_sensitivity(plan.SweepRequest(**fields))
    else:
        for key in ("keep_digital", "keep_analog"):
            fields[key] = tuple(fields[key])
        report, paths = plan.run_placement(plan.PlaceRequest(**fields))
    if not args.quiet:
        print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.cmd == "place" and not report["verification"]["passed"]:
        held = report["verification"]
        print(
            f"{PROG}: held-out check failed: loss {held['loss_mean']:.3g} > "
            f"{report['budget']['key']}={report['budget']['max_loss']} "
            f"(written as {paths['placement']})",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([PROG, *(shlex.quote(w) for w in words)])
    return cli_main(PROG, _parser(), argv, lambda args: _run(args, command))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
