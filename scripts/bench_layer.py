"""AnalogLinear (afm-paper; torch and numba backends) vs nn.Linear vs aihwkit-lightning,
CPU, one run, medians.

Prints, per shape, the eval forward and train forward+backward times and their
ratio to nn.Linear.  Run:  python scripts/bench_layer.py [--threads 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import afm
from afm.analog.layers import AnalogLinear
from afm.kernels import dispatch as ops

SHAPES = [
    # (tokens, in, out, tile width, output noise)
    (512, 1024, 1024, None, 0.0),
    (512, 2048, 2048, 512, 0.04),
    (64, 512, 512, None, 0.0),
]


def lightning_layer(k, n, tiles, out_noise):
    try:
        from aihwkit_lightning.nn import AnalogLinear as LightningLinear
        from aihwkit_lightning.simulator.configs import (
            TorchInferenceRPUConfig,
            WeightClipType,
            WeightNoiseInjectionType,
        )
    except ImportError:
        return None
    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 254
    cfg.forward.out_res = 254
    cfg.forward.out_bound = 14.0
    cfg.forward.out_noise = out_noise
    cfg.forward.out_noise_per_channel = True
    cfg.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    cfg.clip.sigma = 2.5
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    cfg.modifier.std_dev = 0.03
    cfg.mapping.max_input_size = tiles or -1
    ir = cfg.pre_post.input_range
    ir.enable, ir.learn_input_range, ir.init_from_data = True, True, 0
    ir.decay, ir.input_min_percentage = 0.01, 0.95
    return LightningLinear(k, n, bias=True, rpu_config=cfg)


def median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(layer, x, reps):
    def eval_fwd():
        with torch.no_grad():
            layer(x)

    xg = x.clone().requires_grad_()

    def train_step():
        layer(xg).sum().backward()
        layer.zero_grad(set_to_none=True)
        xg.grad = None

    layer.eval()
    e = median_ms(eval_fwd, reps)
    layer.train()
    t = median_ms(train_step, reps)
    return e, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    header = f"{'shape':<34}{'layer':<20}{'eval ms':>9}{'ratio':>7}{'train ms':>10}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for tokens, k, n, tiles, out_noise in SHAPES:
        config = afm.get_preset("afm-paper").replace(
            max_input_size=tiles,
            output_noise=afm.OutputNoiseConfig(std=out_noise, per_channel=True),
        )
        lin = nn.Linear(k, n)
        x = torch.randn(tokens, k)
        layers = [("nn.Linear", lin)]
        for backend in ("torch", "numba"):
            if backend == "numba" and not ops.numba_available():
                continue
            analog = AnalogLinear.from_linear(nn.Linear(k, n), config.replace(backend=backend))
            with torch.no_grad():
                analog.weight.copy_(lin.weight)
                analog.input_range.fill_(3.0)
            layers.append((f"afm ({backend})", analog))
        light = lightning_layer(k, n, tiles, out_noise)
        if light is not None:
            layers.append(("aihwkit-lightning", light))
        shape = f"{tokens} tok, {k}x{n}, tiles={tiles}, on={out_noise}"
        base = None
        for name, layer in layers:
            e, t = bench(layer, x, args.reps)
            base = base or (e, t)
            print(f"{shape:<34}{name:<20}{e:>9.2f}{e / base[0]:>7.2f}{t:>10.2f}{t / base[1]:>7.2f}")
            shape = ""


if __name__ == "__main__":
    main()
