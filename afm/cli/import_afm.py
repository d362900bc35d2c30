"""``afm-import``: IBM's published analog foundation models as afm checkpoints.

    afm-import SOURCE --out DIR [--revision REV]

SOURCE is a hub id (``ibm-aimc/analog-Phi-3-mini-4k-instruct``) or a local directory
in that format (aihwkit-lightning state dict + ``rpu_config``).  Parses the arguments,
calls :func:`afm.interop.import_ibm_afm` and prints its summary.  Bad input (missing
files, no hub, a refused pickle, a chip afm does not model) exits with status 2 and
one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm.cli.common import cli_main, make_parser, setup_logging

PROG = "afm-import"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        PROG,
        "Convert an analog foundation model published by IBM (aihwkit-lightning state "
        "dict + dill-pickled rpu_config) to an afm checkpoint, without running its "
        "pickles. The result loads with AutoModelForCausalLM.from_pretrained after "
        "`import afm`, like any afm checkpoint (e.g. for afm-eval or afm-export).",
    )
    parser.add_argument(
        "source",
        help="hub id (e.g. ibm-aimc/analog-Llama-3.2-1B-Instruct) or local directory",
    )
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def _run(args: argparse.Namespace) -> int:
    from afm.interop import import_ibm_afm

    setup_logging(args.quiet)
    print(import_ibm_afm(args.source, args.out, revision=args.revision))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, build_parser(), argv, _run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
