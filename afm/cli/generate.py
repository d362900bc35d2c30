"""``afm-generate``: sample the synthetic distillation corpus from an FP teacher.

    afm-generate --model tiny --output data/tiny --set num_tokens=200000 --set seq_len=128
    torchrun --nproc_per_node 8 -m afm.cli.generate --model phi-3-mini --output data/phi3 \\
        --config configs/train/phi3-mini-paper.yaml

Keys are the fields of ``afm.data.SyntheticDataConfig`` (``num_tokens``, ``seq_len``,
``sequences_per_shard``, ``batch_size``, ``temperature``, ``top_k``, ``top_p``,
``eos``, ``prompts_file``, ``seed``, ``backend``), given bare or as ``data.KEY``;
``--config`` reads the ``data:`` section of a run YAML (or a flat mapping).
Interrupted runs resume at the next missing shard; under torchrun / accelerate
launch each rank writes its own shards.  Prints the stats summary as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from afm.cli._common import CliError, make_parser, run_cli, setup_logging

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


def build_data_config(config_file: str | None, sets: list[str]) -> Any:
    from afm.data import SyntheticDataConfig
    from afm.train_config import ConfigError, _coerce, load_yaml, parse_set

    names = {f.name for f in dataclasses.fields(SyntheticDataConfig)}
    values: dict[str, Any] = {}
    if config_file:
        raw = load_yaml(config_file)
        section = raw.get("data", raw if not ({"train", "eval", "model"} & set(raw)) else {})
        if not isinstance(section, dict):
            raise ConfigError(f"config file {config_file!r}: 'data' must be a mapping")
        for k, v in section.items():
            if k not in names:
                raise ConfigError(f"config file {config_file!r}: unknown data key {k!r}")
            values[k] = v
    for item in sets:
        key, value = parse_set(item)
        key = key[5:] if key.startswith("data.") else key
        if key not in names:
            raise ConfigError(
                f"--set {item!r}: unknown key {key!r}; allowed: {', '.join(sorted(names))}"
            )
        values[key] = value
    try:
        return SyntheticDataConfig(**_coerce(SyntheticDataConfig, values))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.quiet)

    def go() -> int:
        import torch

        from afm.data import generate_synthetic_data
        from afm.models import load_model, load_tokenizer

        cfg = build_data_config(args.config, args.set)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.distributed.is_available() and "LOCAL_RANK" in __import__("os").environ:
            local = int(__import__("os").environ["LOCAL_RANK"])
            if device == "cuda":
                device = f"cuda:{local}"
        try:
            torch.device(device)
        except RuntimeError:
            raise CliError(f"--device {device!r} is not a valid torch device") from None
        model = load_model(args.model).to(device)
        tokenizer = load_tokenizer(args.model)
        stats = generate_synthetic_data(
            model, tokenizer, args.output, cfg, model_name=args.model, progress=not args.quiet
        )
        print(json.dumps(stats, indent=2))
        return 0

    return run_cli(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
