#!/usr/bin/env python
"""What storing sparse teacher targets costs the sampler: time and bytes per token.

    flock /tmp/afm-heavy.lock python scripts/bench_generation.py            # both models
    python scripts/bench_generation.py --quick                             # tiny only

For each model, one shard is sampled (``afm.training.data.generate_synthetic_data``,
transformers backend, the tiny recipe: temperature 1, 128 tokens per row) with
``data.targets`` = none / top_k / sampled / both.  The four runs are repeated
``--rounds`` times in a rotated order (the machine is noisy; each round's ratios are
taken against that round's ``none`` run) after one warm-up run.  Printed per form: the
median time, the median ratio to ``none`` (goal: ≤ 1.10) and the extra Arrow bytes per
token over the token ids alone.

Models: the bundled tiny teacher (vocab 512) and a random Llama 512/6/1536 with a
32k vocabulary (Phi-3-mini's size), where the per-step log-sum-exp / top-k /
sampling over the vocabulary weighs more against a small network.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import random_llama  # scripts/ is on sys.path when run as a script

from afm.models import load_model, load_tokenizer
from afm.training.data import generate_synthetic_data
from afm.training.data_config import SyntheticDataConfig
from afm.training.teacher_targets import TargetSpec

FORMS = ("none", "top_k", "sampled", "both")


def _arrow_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.arrow"))


def bench(name: str, model, tokenizer, sequences: int, batch: int, rounds: int, out: Path):
    base = dict(seq_len=128, sequences_per_shard=sequences, batch_size=batch, temperature=1.0)
    base["num_tokens"] = sequences * base["seq_len"]

    def run(targets: str) -> tuple[float, int, int]:
        d = out / f"{name}-{targets}"
        shutil.rmtree(d, ignore_errors=True)
        cfg = SyntheticDataConfig(**base, targets=targets)
        t0 = time.perf_counter()
        stats = generate_synthetic_data(model, tokenizer, d, cfg, model_name=name, progress=False)
        return time.perf_counter() - t0, stats["tokens"], _arrow_bytes(d)

    run("none")  # warm-up: allocator, thread pool, first-call paths
    seconds: dict[str, list[float]] = {f: [] for f in FORMS}
    ratios: dict[str, list[float]] = {f: [] for f in FORMS}
    size: dict[str, tuple[int, int]] = {}
    for r in range(rounds):
        order = FORMS[r % len(FORMS) :] + FORMS[: r % len(FORMS)]
        this = {}
        for form in order:
            s, tokens, nbytes = run(form)
            this[form] = s
            seconds[form].append(s)
            size[form] = (tokens, nbytes)
        for form in FORMS:
            ratios[form].append(this[form] / this["none"])
    tokens, plain_bytes = size["none"]
    print(f"\n{name}: one shard of {sequences} x 128 tokens, batch {batch}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds")  # fmt: skip
    print(f"{'targets':<9}{'median s':>10}{'x none (median, range)':>28}"
          f"{'extra B/token':>15}{'spec B/token':>14}")  # fmt: skip
    for form in FORMS:
        rs = ratios[form]
        extra = (size[form][1] - plain_bytes) / tokens
        spec = TargetSpec.from_config(SyntheticDataConfig(targets=form)).bytes_per_token()
        print(f"{form:<9}{statistics.median(seconds[form]):>10.2f}"
              f"{statistics.median(rs):>12.3f}  ({min(rs):.3f}–{max(rs):.3f})"
              f"{extra:>15.1f}{spec:>14}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the tiny model only, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    tokenizer = load_tokenizer("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bench("tiny", load_model("tiny", dtype=torch.float32).eval(), tokenizer, 128, 128,
              rounds, out)  # fmt: skip
        if not args.quick:
            llama = random_llama(512, 6, 1536, 32064, heads=8).eval()
            bench("llama-512x6-v32k", llama, tokenizer, 64, 64, rounds, out)


if __name__ == "__main__":
    main()
