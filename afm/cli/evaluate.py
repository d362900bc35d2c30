"""``afm-eval``: accuracy of (analog) LLMs on a simulated chip.

Modes (see ``docs/evaluation.md``)::

    # FP vs PCM programming noise, 10 seeds, any lm-eval tasks (+ bundled toy tasks)
    afm-eval --model tiny --tasks toyworld_arith,toyworld_facts --noise pcm --seeds 10
    # several models side by side, a suite with per-task shot counts
    afm-eval --model path=tiny,label=teacher --model path=tiny,label=rtn-w4,rtn_w4=true \\
             --suite afm_paper --noise pcm --seeds 10
    # drift sweep 0 s ... 10 years (PCM-like drift model)
    afm-eval --model tiny --tasks toyworld_arith --noise pcm-drift --drift-times all
    # robustness sweep: noise-scale multiplier and I/O bits (needs analog layers)
    afm-eval --model path=tiny,preset=afm-paper --fast --tasks toyworld_arith \\
             --sweep noise.scale=0,1,2,4 --sweep io.bits=4,6,8
    # test-time compute: majority vote and best-of-N vs N (samples drawn once, N=64)
    afm-eval --ttc --model tiny --tasks toyworld_arith --max-n 64 --limit 50

Writes ``<out>/<name>.md``, ``.json`` and ``.png``; prints the markdown table.  Bad
input prints one line ``afm-eval: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

PROG = "afm-eval"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Evaluate models on a simulated analog chip (noise, drift, sweeps, "
        "test-time compute).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("models and tasks")
    g.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="SPEC",
        help="'tiny', a directory, a hub id, or 'path=P,label=L,preset=afm-paper,rtn_w4=true,"
        "calib=toyworld|FILE|none'; repeat for a side-by-side comparison",
    )
    g.add_argument("--tasks", help="lm-eval tasks/groups/tags or YAML paths: 'a,b:5' (b 5-shot)")
    g.add_argument("--suite", help="a suite YAML (or a bundled name: afm_paper, toyworld)")
    g.add_argument("--include-path", action="append", default=[], help="extra lm-eval task dir")
    g.add_argument("--num-fewshot", type=int, help="few-shot count for tasks that give none")
    g.add_argument("--limit", type=float, help="problems per task (an int, or a fraction < 1)")
    g.add_argument(
        "--spread",
        action="store_true",
        help="with --limit: evenly spaced problems instead of the first ones",
    )
    g.add_argument(
        "--fast",
        action="store_true",
        help="toy-world fast path (toyworld_arith / toyworld_facts) without lm-eval",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (1 is much faster on a busy machine: no spinning workers)",
    )
    n = p.add_argument_group("chip")
    n.add_argument("--noise", help="deployment noise model: pcm, gaussian, pcm-drift")
    n.add_argument(
        "--noise-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="noise-model option, e.g. scale=2 or tile_size=512",
    )
    n.add_argument("--seeds", default="10", help="number of noise seeds, or a list '0,1,5'")
    n.add_argument("--drift-times", help="durations '0s,1h,1d,1y,10y' or 'all' (needs pcm-drift)")
    n.add_argument("--no-fp", action="store_true", help="skip the noise-free condition")
    n.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="AXIS=V1,V2",
        help="robustness sweep axis: noise.scale=0,1,2 | io.bits=4,6,8 | "
        "input.bits=... | output.bits=... | any AnalogConfig path",
    )
    t = p.add_argument_group("test-time compute (--ttc)")
    t.add_argument("--ttc", action="store_true", help="majority vote / best-of-N vs N")
    t.add_argument("--max-n", type=int, default=64, help="N = 1, 2, 4, ..., max-n")
    t.add_argument("--ns", help="explicit list of N, e.g. '1,3,9,27'")
    t.add_argument(
        "--scorer",
        action="append",
        default=[],
        help="best-of-N scorer: verifier (default), logprob, rm:<HF reward model>",
    )
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--max-new-tokens", type=int, default=96)
    t.add_argument(
        "--n-subsets",
        type=int,
        default=1,
        help="average each N over this many subsets of the samples (1: prefix)",
    )
    t.add_argument("--sample-seed", type=int, default=0)
    t.add_argument("--sample-batch", type=int, default=256, help="sequences per sampling batch")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="eval/results", help="output directory")
    o.add_argument("--name", help="file stem (default: the mode)")
    o.add_argument("--title", help="table / plot title")
    o.add_argument("--quiet", action="store_true", help="no progress bars, no table on stdout")
    return p


def _noise_options(items: Sequence[str]) -> dict[str, Any]:
    from afm.evaluate import EvalInputError
    from afm.sweep import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--noise-opt {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def _seeds(text: str) -> int | list[int]:
    from afm.evaluate import EvalInputError

    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise EvalInputError(f"--seeds {text!r}: expected a count or a list of ints") from None


def _ns(args: argparse.Namespace) -> list[int]:
    from afm.evaluate import EvalInputError
    from afm.ttc import check_ns, default_ns

    try:
        if args.ns:
            return check_ns([int(x) for x in args.ns.split(",") if x.strip()])
        return default_ns(args.max_n)
    except ValueError as err:
        raise EvalInputError(f"--ns/--max-n: {err}") from None


def _limit(value: float | None) -> int | float | None:
    from afm.evaluate import EvalInputError

    if value is None:
        return None
    if value <= 0:
        raise EvalInputError(f"--limit must be > 0, got {value:g}")
    return int(value) if value >= 1 else value


def run(args: argparse.Namespace) -> int:
    from afm import evaluate as ev
    from afm.noise import DRIFT_TIMES

    progress = not args.quiet
    if args.threads is not None:
        if args.threads <= 0:
            raise ev.EvalInputError(f"--threads must be > 0, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    models = [ev.ModelSpec.parse(m) for m in args.model]
    for m in models:
        ev.check_model_spec(m)
    if args.suite and args.tasks:
        raise ev.EvalInputError("give --tasks or --suite, not both")
    if args.suite:
        specs, suite_meta = ev.load_suite(args.suite)
    elif args.tasks:
        specs, suite_meta = ev.parse_tasks(args.tasks), {}
    else:
        raise ev.EvalInputError("no tasks: give --tasks or --suite")
    if args.num_fewshot is not None:
        specs = [
            s
            if s.num_fewshot is not None
            else ev.TaskSpec(s.task, args.num_fewshot, s.metric, s.limit)
            for s in specs
        ]
    limit = _limit(args.limit)
    noise_opts = _noise_options(args.noise_opt)
    seeds = _seeds(args.seeds)
    ns = _ns(args) if args.ttc else []
    drift = None
    if args.drift_times:
        drift = (
            list(DRIFT_TIMES)
            if args.drift_times.strip() == "all"
            else [t.strip() for t in args.drift_times.split(",") if t.strip()]
        )
    meta: dict[str, Any] = {
        "command": " ".join([PROG] + [shlex.quote(a) for a in sys.argv[1:]]),
        "models": [m.__dict__ for m in models],
        "tasks": [s.__dict__ for s in specs],
        "limit": limit,
        **({"suite": suite_meta} if suite_meta else {}),
    }

    if args.sweep:
        from afm.sweep import sweep_conditions

        if drift:
            raise ev.EvalInputError("--sweep and --drift-times cannot be combined")
        conds = sweep_conditions(
            args.sweep, noise=args.noise, noise_options=noise_opts, seeds=seeds
        )
        if not args.no_fp:
            conds = [ev.Condition("fp")] + conds
    else:
        conds = ev.make_conditions(args.noise, seeds, drift, noise_opts, not args.no_fp)
    if not conds:
        raise ev.EvalInputError("nothing to evaluate (--no-fp without --noise)")

    if args.ttc:
        from afm import ttc

        if len(specs) != 1:
            raise ev.EvalInputError("--ttc takes exactly one task")
        task = specs[0].task
        if args.fast or task == "toyworld_arith":
            source: Any = ttc.ToyArithSource(
                limit=int(limit) if limit else None, spread=args.spread
            )
        else:
            source = ttc.LmEvalSource(
                task,
                num_fewshot=specs[0].num_fewshot,
                limit=limit,
                include_path=args.include_path,
                metric=specs[0].metric,
            )
        report = ttc.run_ttc(
            models,
            source,
            ns,
            conditions=conds,
            scorers=args.scorer or ["verifier"],
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            n_subsets=args.n_subsets,
            sample_seed=args.sample_seed,
            batch_size=args.sample_batch,
            device=args.device,
            title=args.title or f"test-time compute: {task}",
            meta=meta,
            progress=progress,
        )
        stem = args.name or "ttc"
    else:
        if args.fast:
            runner: Any = ev.ToyRunner(
                [s.task for s in specs], limit=int(limit) if limit else None, spread=args.spread
            )
        else:
            runner = ev.LmEvalRunner(
                specs,
                include_path=args.include_path,
                limit=limit,
                spread=args.spread,
                batch_size=args.batch_size,
            )
        if args.sweep:
            stem, layout = args.name or "sweep", "conditions"
        else:
            stem, layout = args.name or ("drift" if drift else "eval"), "tasks"
        report = ev.run_evaluation(
            models,
            runner,
            conds,
            device=args.device,
            title=args.title or stem,
            meta=meta,
            progress=progress,
        )
        report.layout = layout
    paths = report.write(args.out, stem)
    if not args.quiet:
        print(report.to_markdown())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    from afm.evaluate import EvalInputError

    try:
        return run(args)
    except (EvalInputError, ValueError, FileNotFoundError, ImportError) as err:
        # EvalInputError: bad input; ValueError: validation in afm.config / noise / ttc
        msg = " ".join(str(err).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
