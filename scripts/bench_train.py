#!/usr/bin/env python
"""Benchmark the AFM distillation step and the KD loss's memory on CPU.

    python scripts/bench_train.py            # tiny model + a larger random Llama
    python scripts/bench_train.py --quick    # fewer steps, smaller loss-memory case

1. Time per optimizer step (teacher forward + student forward/backward + KD loss +
   AdamW + clipping) of AFM distillation (student converted with ``afm-paper``:
   8-bit inputs/outputs, learned ranges, 3 % weight noise, clipping; the default
   backend, i.e. the fused numba kernels on CPU when numba is installed, or the one
   ``--backend`` names) vs plain KD into a digital student; same model, same batch.
   Goal: AFM ≤ 1.3× plain KD.  Also the teacher-free AFM step (cached random-sampling
   KD targets, :mod:`afm.training.sparse_kd`; goal ≤ 0.9× plain KD), a plain
   cross-entropy step of the digital student (the floor), and the peak training memory
   of the AFM step with and without the teacher's weights.
2. Peak memory allocated by the KD loss (forward + backward) vs the naive fp32
   loss, measured with ``torch.profiler`` memory events (allocations made inside
   the loss only; the logits themselves exist before).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import afm
from afm.analog.clipping import register_clip_hook
from afm.training.distill import make_student
from afm.training.kd_loss import causal_lm_labels, kd_loss, naive_kd_loss, peak_cpu_memory
from afm.training.sparse_kd import sparse_kd_loss
from afm.training.teacher_targets import TargetSpec, sparse_targets


def random_llama(hidden: int, layers: int, ffn: int, vocab: int, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _tiny():
    try:
        from afm.models import load_model

        return load_model("tiny", dtype=torch.float32), "tiny (bundled teacher)"
    except Exception:  # noqa: BLE001  (not trained yet: same shape, random weights)
        return random_llama(256, 4, 768, 512), "tiny-shaped random Llama (256/4/768, vocab 512)"


class _Stepper:
    """One optimizer step into ``student``: ``mode`` "live" (teacher forward + KD loss),
    "cached" (sparse targets computed once beforehand: no teacher in the step) or "ce"
    (next-token cross entropy, no teacher: the floor any distillation step can reach)."""

    def __init__(self, teacher, student, ids, mode: str = "live", samples: int = 12) -> None:
        self.teacher = teacher.eval() if mode == "live" else None
        self.student, self.ids, self.mode = student.train(), ids, mode
        self.mask = torch.ones_like(ids)
        self.labels = causal_lm_labels(ids, self.mask)
        if mode == "cached":  # what the shards hold: random-sampling KD targets
            spec = TargetSpec(("sampled",), samples=samples)
            with torch.no_grad():
                logits = teacher(input_ids=ids).logits
            tg = sparse_targets(logits.reshape(-1, logits.shape[-1]), spec, None)
            shape = (*ids.shape, samples)
            self.t_ids = torch.from_numpy(tg["sampled_ids"]).long().reshape(shape)
            self.t_w = torch.from_numpy(tg["sampled_weights"]).float().reshape(shape)
            self.t_c = -torch.from_numpy(tg["entropy"]).reshape(ids.shape)
        self.opt = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=1e-4,
            betas=(0.9, 0.98),
            eps=1e-6,
            weight_decay=0.01,
        )
        if afm.analog_layers(student):
            register_clip_hook(self.opt, student)

    def _loss(self):
        out = self.student(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        if self.mode == "ce":
            return torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), self.labels.reshape(-1), ignore_index=-100
            )
        if self.mode == "cached":
            return sparse_kd_loss(
                out, self.t_ids, self.t_w, self.t_c, mask=self.mask, chunk_size=512,
                inplace_backward=True,
            ).loss  # fmt: skip
        with torch.no_grad():
            t_logits = self.teacher(input_ids=self.ids, attention_mask=self.mask).logits
        return kd_loss(out, t_logits, mask=self.mask, chunk_size=512, inplace_backward=True).loss

    def step(self) -> None:
        self._loss().backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0

    def resident_bytes(self) -> int:
        """Weights and optimizer state that live across steps (the teacher's if live)."""
        models = [self.student] + ([self.teacher] if self.teacher is not None else [])
        total = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        for state in self.opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if v.dim() > 0)
        return total


def time_steppers(steppers: list, steps: int, warmup: int = 2) -> list[float]:
    """Median seconds per step of each stepper, steps interleaved (fair under load)."""
    times: list[list[float]] = [[] for _ in steppers]
    for i in range(warmup + steps):
        for k, stepper in enumerate(steppers):
            t = stepper()
            if i >= warmup:
                times[k].append(t)
    return [statistics.median(t) for t in times]


def _digital_copy(teacher):
    plain = copy.deepcopy(teacher)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def bench_step(name: str, teacher, batch: int, seq: int, steps: int, backend: str) -> None:
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    chip = afm.get_preset("afm-paper").replace(backend=backend)
    analog = make_student(teacher, chip)
    cached_student = make_student(teacher, chip)
    layer = next(iter(afm.analog_layers(analog).values()))
    resolved = layer.backend_for(torch.device("cpu")).value
    steppers = [
        _Stepper(teacher, _digital_copy(teacher), ids),
        _Stepper(teacher, analog, ids),
        _Stepper(teacher, cached_student, ids, mode="cached"),
        _Stepper(teacher, _digital_copy(teacher), ids, mode="ce"),
    ]
    t_plain, t_afm, t_cached, t_ce = time_steppers(steppers, steps)
    mib = 2**20
    peaks = [s.resident_bytes() + peak_cpu_memory(s.step) for s in steppers[1:3]]
    n_params = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"[step] {name}: {n_params:.1f} M params, batch {batch} x {seq} tokens, "
        f"{torch.get_num_threads()} threads, backend {resolved}\n"
        f"       plain KD (digital student, live teacher): {1e3 * t_plain:8.1f} ms/step\n"
        f"       AFM, live teacher:                        {1e3 * t_afm:8.1f} ms/step  "
        f"{t_afm / t_plain:.2f}x plain KD (goal <= 1.3x)\n"
        f"       AFM, cached sampled targets (no teacher): {1e3 * t_cached:8.1f} ms/step  "
        f"{t_cached / t_plain:.2f}x plain KD (goal <= 0.9x), {t_cached / t_ce:.2f}x CE\n"
        f"       plain CE step (digital student):          {1e3 * t_ce:8.1f} ms/step\n"
        f"       peak training memory (weights + Adam + one step's allocations): "
        f"live {peaks[0] / mib:.0f} MiB, cached {peaks[1] / mib:.0f} MiB "
        f"({peaks[1] / peaks[0]:.2f}x)"
    )


def bench_loss_memory(tokens: int, vocab: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(tokens, vocab, generator=g).requires_grad_(True)
    t = torch.randn(tokens, vocab, generator=g)
    unit = tokens * vocab * 4
    t0 = time.perf_counter()
    p_naive = peak_cpu_memory(lambda: naive_kd_loss(s, t).loss.backward())
    t_naive = time.perf_counter() - t0
    s.grad = None
    t0 = time.perf_counter()
    p_chunk = peak_cpu_memory(lambda: kd_loss(s, t, chunk_size=chunk).loss.backward())
    t_chunk = time.perf_counter() - t0
    s.grad = None
    logits = s.detach().clone().requires_grad_(True)
    p_inpl = peak_cpu_memory(
        lambda: kd_loss(logits, t, chunk_size=chunk, inplace_backward=True).loss.backward()
    )
    mib = 2**20
    print(
        f"[loss memory] {tokens} tokens x vocab {vocab} (one fp32 logits tensor = "
        f"{unit / mib:.0f} MiB), chunk {chunk}\n"
        f"       naive fp32 KD loss:         peak {p_naive / mib:8.0f} MiB "
        f"({p_naive / unit:.2f} x logits), {t_naive:.1f} s fwd+bwd\n"
        f"       chunked KD loss:            peak {p_chunk / mib:8.0f} MiB "
        f"({p_chunk / unit:.2f} x), ratio {p_chunk / p_naive:.3f}, {t_chunk:.1f} s\n"
        f"       chunked, in-place backward: peak {p_inpl / mib:8.0f} MiB "
        f"({p_inpl / unit:.2f} x), ratio {p_inpl / p_naive:.3f} (goal <= 0.25; the "
        "trainer's mode)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--backend", choices=["auto", "torch", "numba"], default="auto")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 8)
    tiny, tiny_name = _tiny()
    bench_step(tiny_name, tiny, 16, 128, steps, args.backend)
    big = random_llama(512, 6, 1536, 8192, heads=8)
    bench_step("random Llama (512/6/1536, vocab 8192)", big, 4, 256, steps, args.backend)
    if args.quick:
        bench_loss_memory(1024, 8192, 256)
    else:
        bench_loss_memory(2 * 2048, 32000, 256)


if __name__ == "__main__":
    main()
