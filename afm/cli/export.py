"""``afm-export``: write a 4-bit compressed-tensors checkpoint of a model.

    afm-export --model DIR_OR_ALIAS --out DIR [--group-size G] [--skip NAME ...] [--dense]

Parses the arguments, calls :func:`afm.export.export_int4` (or, with ``--dense``,
:func:`afm.export.export_rtn_w4`) and prints its summary.
Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm.cli.common import cli_main, make_parser

PROG = "afm-export"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        PROG,
        "Export a model (plain or afm) as symmetric round-to-nearest 4-bit weights in the "
        "compressed-tensors pack-quantized format (loads with plain transformers and vLLM). "
        "Analog layers are exported as their digital weights.",
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint directory, afm alias (e.g. 'tiny') or hub id"
    )
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="G",
        help="one scale per G consecutive inputs (e.g. 32, 64, 128); default: per channel",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=None,
        metavar="NAME",
        help=(
            "linear layers to keep unquantized, by name or dotted suffix (default: lm_head); "
            "'--skip' with no name quantizes every linear layer"
        ),
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help=(
            "write the dense RTN-W4 checkpoint instead (4-bit values in the model dtype): "
            "for MoE experts and GPT-2 Conv1D, which the pack-quantized format cannot express"
        ),
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    from afm.export import DEFAULT_SKIP, export_int4, export_rtn_w4

    skip = DEFAULT_SKIP if args.skip is None else tuple(args.skip)
    if args.dense:
        out = export_rtn_w4(args.model, args.out, group_size=args.group_size, skip=skip)
        print(f"afm export: dense RTN-W4 checkpoint -> {out}")
        return 0
    print(export_int4(args.model, args.out, group_size=args.group_size, skip=skip))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, build_parser(), argv, _run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
