"""``afm-generate``: sample the synthetic distillation corpus from an FP teacher.

    afm-generate --model tiny --output data/tiny --set num_tokens=200000 --set seq_len=128
    torchrun --nproc_per_node 8 -m afm.cli.generate --model phi-3-mini --output data/phi3 \\
        --config configs/train/phi3-mini-paper.yaml

Keys are the fields of ``afm.training.data_config.SyntheticDataConfig`` (``num_tokens``,
``seq_len``, ``sequences_per_shard``, ``batch_size``, ``temperature``, ``top_k``,
``top_p``, ``eos``, ``prompts_file``, ``seed``, ``backend``, and the cached sparse
teacher targets ``targets`` (none / top_k / sampled / both), ``targets_k``,
``targets_samples``, ``targets_proposal_temperature``), given bare or as
``data.KEY``; ``--config`` reads the ``data:`` section of a run YAML (or a flat
mapping).  Interrupted runs resume at the next missing shard; under torchrun /
accelerate launch each rank writes its own shards.  Prints the stats summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from afm.cli.common import cli_main, make_parser, setup_logging

PROG = "afm-generate"


def _parser():  # noqa: ANN202
    p = make_parser(PROG, __doc__)
    p.add_argument("--model", required=True, help="alias, local directory or hub id")
    p.add_argument("--output", required=True, help="shard directory")
    p.add_argument("--config", help="YAML with a data: section (or a flat mapping)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    from afm.training.data import generate_for_model
    from afm.training.run_config import data_config_from

    setup_logging(args.quiet)
    cfg = data_config_from(args.config, args.set)
    stats = generate_for_model(
        args.model, args.output, cfg, device=args.device, progress=not args.quiet
    )
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(main())
