#!/usr/bin/env python
"""Benchmark the fused Triton analog linear layer against cuBLAS (and aihwkit-lightning).

Measures TFLOP/s of

* ``fwd``: the eval-mode forward (8-bit input DAC with learned ranges, 8-bit ADC
  with bound 14, per-channel statistics: the afm-paper chip), and
* ``fwd+bwd``: a training step's forward and backward with weight noise
  (σ_w = 0.03 per channel) and gradients of x, W and the input ranges,

against ``torch.nn.functional.linear`` (cuBLAS) in bf16, at 4096×4096×4096 and at
Phi-3-mini shapes (3072→9216, 3072→16384, 8192→3072) with 2048 tokens (prefill /
training) and 1 token (decode), with one tile and with 512-wide tiles.
aihwkit-lightning's Triton path (``AIHWKIT_USE_TRITON=1``) is timed too when it
imports and runs.  Prints a table with the ratios to cuBLAS (goal: fused forward
≥ 0.8×).  Without a CUDA GPU it prints a message and exits with status 0.

Usage::

    python scripts/bench_kernels.py                 # full table
    python scripts/bench_kernels.py --quick         # 4096³ only
    python scripts/bench_kernels.py --no-lightning  # skip aihwkit-lightning
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from functools import partial

import torch

# (label, tokens M, out features N, in features K)
SHAPES: list[tuple[str, int, int, int]] = [
    ("square 4096^3", 4096, 4096, 4096),
    ("phi3 qkv 3072->9216", 2048, 9216, 3072),
    ("phi3 up 3072->16384", 2048, 16384, 3072),
    ("phi3 down 8192->3072", 2048, 3072, 8192),
    ("phi3 qkv decode", 1, 9216, 3072),
    ("phi3 up decode", 1, 16384, 3072),
    ("phi3 down decode", 1, 3072, 8192),
]
TILES: list[int | None] = [None, 512]


def _bench(fn: Callable[[], object], args: argparse.Namespace, grads=()) -> float:
    """Median milliseconds per call (gradients reset to None between calls)."""
    import triton.testing

    return float(
        triton.testing.do_bench(
            fn, warmup=args.warmup, rep=args.rep, grad_to_none=list(grads), return_mode="median"
        )
    )


def _fwd_bwd(fn: Callable[..., torch.Tensor], g: torch.Tensor, *a, **kw) -> None:
    fn(*a, **kw).backward(g)


def _no_grad(fn: Callable[..., object], *a, **kw) -> object:
    with torch.no_grad():
        return fn(*a, **kw)


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def _bench_shape(
    label: str,
    m: int,
    n: int,
    k: int,
    args: argparse.Namespace,
    lightning: list[str],
    dev: torch.device | None = None,
) -> list[str]:
    """One table row per tile setting.  ``lightning`` collects the reason it was skipped."""
    from afm.triton_kernels.analog_linear import triton_analog_linear

    from afm import reference

    dtype, dev = torch.bfloat16, dev or torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen)
    w = (torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * 0.02).requires_grad_()
    g = torch.randn(m, n, device=dev, dtype=dtype, generator=gen)
    xg = x.clone().requires_grad_()
    flops_f, flops_fb = 2.0 * m * n * k, 6.0 * m * n * k
    linear = torch.nn.functional.linear
    t_lin_f = _bench(partial(_no_grad, linear, x, w), args)
    t_lin_fb = _bench(partial(_fwd_bwd, linear, g, xg, w), args, (xg, w))
    rows = []
    for tiles in TILES:
        cfg_eval, cfg_train = _afm_config(tiles, noise=False), _afm_config(tiles, noise=True)
        s = cfg_eval.num_tiles(k)
        r = torch.full((s,), 3.0, device=dev, dtype=torch.float32, requires_grad=True)
        # Eval-mode layers pass their cached weight statistics: do the same.
        a = reference.weight_abs_max(w, reference.tile_bounds(k, tiles))
        fwd = partial(
            _no_grad, triton_analog_linear, x, w, None, r, cfg_eval, training=False, abs_max=a
        )
        t_afm_f = _bench(fwd, args)
        step = partial(
            _fwd_bwd, triton_analog_linear, g, xg, w, None, r, cfg_train, training=True, seed=1
        )
        t_afm_fb = _bench(step, args, (xg, w, r))
        light_f = light_fb = "-"
        if not lightning:
            try:
                layer = _lightning_layer(n, k, tiles, dtype, dev)
                layer.eval()
                t = _bench(partial(_no_grad, layer, x), args)
                light_f = f"{_tflops(flops_f, t):.1f}"
                layer.train()
                t = _bench(partial(_fwd_bwd, layer, g, xg), args, [xg, *layer.parameters()])
                light_fb = f"{_tflops(flops_fb, t):.1f}"
            except Exception as exc:  # not installed, or its triton path fails here
                lightning.append(f"aihwkit-lightning skipped: {type(exc).__name__}: {exc}")
        rows.append(
            f"{label:<22}{m:>6}{n:>7}{k:>6}{str(tiles or '-'):>7} | "
            f"{_tflops(flops_f, t_lin_f):>10.1f}{_tflops(flops_f, t_afm_f):>9.1f}"
            f"{t_lin_f / t_afm_f:>7.2f}{light_f:>8} | "
            f"{_tflops(flops_fb, t_lin_fb):>10.1f}{_tflops(flops_fb, t_afm_fb):>9.1f}"
            f"{t_lin_fb / t_afm_fb:>7.2f}{light_fb:>8}"
        )
    return rows


def _afm_config(tiles: int | None, *, noise: bool):
    from afm.config import AnalogConfig, Backend, ClipConfig, WeightNoiseConfig

    return AnalogConfig(
        clip=ClipConfig(kind="gaussian_per_channel", sigma=2.5),
        weight_noise=(
            WeightNoiseConfig(kind="add_gauss_per_channel", std=0.03)
            if noise
            else WeightNoiseConfig()
        ),
        max_input_size=tiles,
        backend=Backend.TRITON,
    )


def _lightning_layer(n: int, k: int, tiles: int | None, dtype: torch.dtype, device="cuda"):
    """aihwkit-lightning's AnalogLinear with the same chip, or an exception."""
    os.environ["AIHWKIT_USE_TRITON"] = "1"  # lightning reads this inside its forward
    from aihwkit_lightning.nn import AnalogLinear as LightningLinear
    from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig
    from aihwkit_lightning.simulator.parameters.enums import (
        WeightClipType,
        WeightNoiseInjectionType,
    )

    rpu = TorchInferenceRPUConfig()
    rpu.forward.inp_res = 2**8 - 2
    rpu.forward.out_res = 2**8 - 2
    rpu.forward.out_bound = 14.0
    rpu.forward.out_noise = 0.0
    rpu.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    rpu.clip.sigma = 2.5
    rpu.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    rpu.modifier.std_dev = 0.03
    rpu.mapping.max_input_size = tiles if tiles is not None else -1
    rpu.pre_post.input_range.enable = True
    rpu.pre_post.input_range.learn_input_range = True
    rpu.pre_post.input_range.init_from_data = 0
    return LightningLinear(k, n, bias=False, device=device, dtype=dtype, rpu_config=rpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 4096^3 shape")
    parser.add_argument("--no-lightning", action="store_true", help="skip aihwkit-lightning")
    parser.add_argument("--warmup", type=int, default=25, help="warmup time per case (ms)")
    parser.add_argument("--rep", type=int, default=100, help="measurement time per case (ms)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU available; nothing to benchmark (no numbers).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: triton is not installed (pip install 'afm[triton]').")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: TRITON_INTERPRET=1 is set; unset it to benchmark the GPU.")
        return 0

    gpu = torch.cuda.get_device_name(torch.device("cuda"))
    print(f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}; dtype bf16")
    shapes = SHAPES[:1] if args.quick else SHAPES
    header = (
        f"{'shape':<22}{'M':>6}{'N':>7}{'K':>6}{'tiles':>7} | {'cuBLAS fwd':>10}{'afm fwd':>9}"
        f"{'ratio':>7}{'light.':>8} | {'cuBLAS f+b':>10}{'afm f+b':>9}{'ratio':>7}{'light.':>8}"
    )
    print("TFLOP/s (ratios: afm / cuBLAS)")
    print(header)
    print("-" * len(header))
    lightning: list[str] = [] if not args.no_lightning else ["aihwkit-lightning: --no-lightning"]
    for label, m, n, k in shapes:
        for line in _bench_shape(label, m, n, k, args, lightning):
            print(line)
            sys.stdout.flush()
    if lightning:
        print(lightning[0])
    print(
        "fwd: eval forward (8-bit DAC/ADC, bound 14, per-channel); fwd+bwd: training step "
        "with per-channel weight noise 0.03 and grads of x, W, input range."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
