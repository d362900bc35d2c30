#!/usr/bin/env python
"""afm's two ``pcm-drift`` modes side by side on one random weight matrix.

    python scripts/drift_modes.py [--size 512] [--seeds 5]

Prints, per drift time, the relative error std ``std((W_t - W) / max|W_row|)`` and the
gain ``<W_t, W> / <W, W>`` after drift compensation, mean over seeds, for ``mode="afm"``
(ideal per-layer read-out) and ``mode="aihwkit"`` (ideal read-out, and through the
ahwa-lora periphery: 8-bit ADC, bound 12, output noise 0.04).  Per-channel mapping,
tiles of 512 inputs.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from afm.analog.noise import DRIFT_TIMES, PCMDriftNoise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    amax = w.abs().amax(dim=1, keepdim=True)
    modes = {
        "afm": dict(mode="afm"),
        "aihwkit (ideal read)": dict(mode="aihwkit"),
        "aihwkit (ahwa-lora periphery)": dict(
            mode="aihwkit", readout_bits=8, readout_bound=12.0, readout_noise=0.04
        ),
    }
    print(f"{'time':>5}  " + "  ".join(f"{m:>34}" for m in modes))
    for label, t in DRIFT_TIMES.items():
        cells = []
        for opts in modes.values():
            nm = PCMDriftNoise(t_inference=t, tile_size=512, per_channel=True, **opts)
            errs, gains = [], []
            for seed in range(args.seeds):
                out = nm.perturb_weight(w, torch.Generator().manual_seed(seed))
                errs.append(((out - w) / amax).std().item())
                gains.append(((out * w).sum() / (w * w).sum()).item())
            cells.append(f"err {statistics.fmean(errs):.4f}  gain {statistics.fmean(gains):.3f}")
        print(f"{label:>5}  " + "  ".join(f"{c:>34}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
