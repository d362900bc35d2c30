#!/usr/bin/env python
"""Benchmark an analog MoE experts layer against the digital experts forward, side by side.

One transformers experts module (Mixtral layout: ``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) is timed in one run:

* ``digital``: the module itself with transformers' default experts implementation
  (``grouped_mm``) and with its ``eager`` loop, and
* ``analog``: ``afm.AnalogExperts`` on the afm-paper chip (8-bit DAC with learned ranges,
  8-bit ADC per channel) in eval mode (the programmed chip, no resampled noise) and a
  training forward + backward (weight and output noise, all gradients), with the torch and
  numba backends;

and the ratios analog / digital (grouped_mm) are printed.  CPU by default (``--device
cuda`` uses the triton backend for the analog op, one launch per expert).  Run it holding
the shared lock: ``flock /tmp/afm-heavy.lock python scripts/bench_moe.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import afm
from afm.config import Backend


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (numba compiles, caches fill)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    cfg._experts_implementation = "grouped_mm"
    dev = torch.device(args.device)
    digital = MixtralExperts(cfg).to(dev)
    with torch.no_grad():
        for p in digital.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(args.tokens, args.hidden, device=dev)
    logits = torch.randn(args.tokens, args.experts, device=dev)
    weights, index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)

    def run(module: torch.nn.Module, train: bool) -> Callable[[], object]:
        def fwd() -> object:
            if not train:
                with torch.no_grad():
                    return module(x, index, weights)
            module.zero_grad(set_to_none=True)
            xi = x.detach().requires_grad_(True)
            module(xi, index, weights).square().sum().backward()
            return None

        return fwd

    print(
        f"experts={args.experts} top_k={args.top_k} hidden={args.hidden} "
        f"intermediate={args.intermediate} tokens={args.tokens} threads={args.threads} "
        f"device={dev.type}; median of {args.repeats} (seconds)"
    )
    rows = []
    for train in (False, True):
        mode = "train fwd+bwd" if train else "eval fwd"
        digital.train(train)
        grouped = _time(run(digital, train), args.repeats)
        cfg._experts_implementation = "eager"
        eager = _time(run(digital, train), args.repeats)
        cfg._experts_implementation = "grouped_mm"
        rows.append((mode, "digital grouped_mm", grouped, 1.0))
        rows.append((mode, "digital eager loop", eager, eager / grouped))
        backends = [Backend.TORCH, Backend.NUMBA] if dev.type == "cpu" else [Backend.TRITON]
        for backend in backends:
            chip = dataclasses.replace(afm.get_preset("afm-paper"), backend=backend)
            analog = afm.AnalogExperts.from_experts(copy.deepcopy(digital), chip).train(train)
            analog.noise_generator = torch.Generator(device=dev).manual_seed(0)
            t = _time(run(analog, train), args.repeats)
            rows.append((mode, f"analog ({backend.value})", t, t / grouped))
    print(f"{'mode':<14} {'implementation':<22} {'seconds':>10} {'x grouped_mm':>13}")
    for mode, name, t, ratio in rows:
        print(f"{mode:<14} {name:<22} {t:>10.4f} {ratio:>13.2f}")


if __name__ == "__main__":
    main()
