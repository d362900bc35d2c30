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
input prints one line ``afm-eval: error: ...`` and exits with status 2.  The pipeline
is ``afm.evaluate.command.run_eval_request``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence

from afm.cli.common import cli_main, make_parser

PROG = "afm-eval"


def _parser() -> argparse.ArgumentParser:
    p = make_parser(
        PROG,
        "Evaluate models on a simulated analog chip (noise, drift, sweeps, test-time compute).",
    )
    g = p.add_argument_group("models and tasks")
    g.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="SPEC",
        help="'tiny', a directory, a hub id, or 'path=P,label=L,preset=afm-paper (or "
        "placement=FILE from afm-plan),rtn_w4=true,"
        "calib=toyworld|FILE|none'; repeat for a side-by-side comparison",
    )
    g.add_argument(
        "--tasks",
        help="lm-eval tasks/groups/tags or YAML paths: 'a,b:5' (b 5-shot); task YAMLs can "
        "run Python (!function), so pass only files you trust",
    )
    g.add_argument("--suite", help="a suite YAML (or a bundled name: afm_paper, toyworld)")
    g.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="extra lm-eval task dir (trusted code only: its YAMLs can run Python)",
    )
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
    o.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, no warnings (lm-eval's included), no table on stdout",
    )
    return p


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars and no library warnings for the duration: errors only.

    ``TQDM_DISABLE`` is read when tqdm is imported (already done) and loses to the
    explicit ``disable=False`` lm-eval passes, so every tqdm bar is switched off at its
    constructor instead (restored on exit); lm-eval's, transformers' and datasets'
    loggers go to ERROR and Python warnings are ignored."""
    import tqdm.std

    cls = tqdm.std.tqdm
    original = cls.__dict__["__init__"]

    def silent_init(self, *a, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
        kw["disable"] = True
        original.__get__(self, type(self))(*a, **kw)

    names = ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "afm")
    levels = {n: logging.getLogger(n).level for n in names}
    cls.__init__ = silent_init
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cls.__init__ = original
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from afm.evaluate.command import EvalRequest, run_eval_request

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fields = {k: v for k, v in vars(args).items() if k != "model"}
    command = " ".join([PROG] + [shlex.quote(a) for a in sys.argv[1:]])
    request = EvalRequest(models=args.model, command=command, **fields)
    with _quiet() if args.quiet else contextlib.nullcontext():
        report, paths = run_eval_request(request)
    if not args.quiet:
        print(report.to_markdown())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, _parser(), argv, _run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
