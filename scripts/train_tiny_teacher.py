#!/usr/bin/env python
"""Train afm's embedded tiny teacher on the toy world (CPU, deterministic).

    python scripts/train_tiny_teacher.py --out afm/assets/tiny

Trains a byte-level BPE tokenizer (vocab 512) and a small LlamaForCausalLM on
packed 128-token rows of toy-world training documents, with a step-based
schedule (AdamW (0.9, 0.98), wd 0.05, lr 2e-3, 3 % warm-up, cosine to 1e-4,
grad clip 1.0).  Everything is seeded: the same command gives the same weights
on the same software stack and thread count.  At the end it measures accuracy
on the test split and writes safetensors, config, tokenizer, generation config,
``train_log.json`` and a model card ``README.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from afm import toyworld as tw
from afm.toyworld.tokenizer import train_tokenizer


def packed_rows(tok, docs, seq: int):
    """Yield lists of ``seq`` token ids: BOS + newline-separated documents."""
    nl = tok.convert_tokens_to_ids("Ċ")
    buf: list[int] = []
    while True:
        batch = list(itertools.islice(docs, 256))
        for ids in tok(batch, add_special_tokens=False).input_ids:
            buf.extend(ids)
            buf.append(nl)
        while len(buf) >= seq - 1:
            yield [tok.bos_token_id] + buf[: seq - 1]
            buf = buf[seq - 1 :]


def evaluate_all(model, tok, n_arith_per_kind: int = 40, seed: int = 0) -> dict:
    """Test-split accuracies: arithmetic per (digits, op) and facts."""
    res: dict[str, float] = {}
    total, n = 0.0, 0
    for d in (2, 3):
        for op in ("+", "-"):
            probs = tw.arith_problems("test", n_arith_per_kind, seed=seed, digits=(d,), ops=(op,))
            acc = tw.evaluate_arith(model, tok, probs, batch_size=40)
            res[f"arith_{d}d_{'add' if op == '+' else 'sub'}"] = acc
            total += acc * len(probs)
            n += len(probs)
    res["arith_all"] = total / n
    res["facts"] = tw.evaluate_facts(model, tok, tw.fact_questions("test"))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="afm/assets/tiny")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=0.03)
    ap.add_argument("--wd", type=float, default=0.05)
    # One thread by default: on a shared 2-core machine a 2-thread run stalls at every
    # intra-op barrier when the other core is busy (measured 15 s/step vs 3.9 s/step).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-per-kind", type=int, default=25)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus_cfg = tw.ToyWorldConfig(seed=args.seed)
    tok = train_tokenizer(itertools.islice(tw.training_documents(corpus_cfg), 20_000))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warm = max(1, int(args.warmup * args.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))

    rows = packed_rows(tok, tw.training_documents(corpus_cfg), args.seq)
    log: list[dict] = []
    model.train()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        x = torch.tensor(list(itertools.islice(rows, args.batch)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            log.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "lr": lr_at(step),
                    "grad_norm": round(float(gn), 3),
                    "time_s": round(time.time() - t0, 1),
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - t0
    print(f"train wall: {train_s:.0f} s", flush=True)

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("Ċ")],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.to(getattr(torch, args.dtype))
    acc = evaluate_all(model, tok, args.eval_per_kind)
    total_s = time.time() - t0
    print(json.dumps(acc, indent=1), flush=True)

    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "corpus": corpus_cfg.__dict__ | {"digits": list(corpus_cfg.digits)},
        "n_params": n_params,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(total_s, 1),
        "tokens_seen": args.steps * args.batch * args.seq,
        "test_accuracy": acc,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(meta, indent=1))
    write_card(out, meta)
    print(f"saved to {out} in {total_s:.0f} s", flush=True)


def write_card(out: Path, meta: dict) -> None:
    a = meta["args"]
    acc = meta["test_accuracy"]
    lm_eval_table = ""
    lm_path = out / "lm_eval_results.json"
    if lm_path.exists():
        r = json.loads(lm_path.read_text())
        lm_eval_table = (
            "\n\n| lm-eval task | metric | value |\n|---|---|---|\n"
            f"| `toyworld_arith` (200) | exact_match | {100 * r['arith']:.1f} % |\n"
            f"| `toyworld_facts` (144) | acc | {100 * r['facts']:.1f} % |\n"
            f"| `toyworld_ppl` (200) | bits_per_byte | {r['bits_per_byte']:.3f} |\n"
            f"| `toyworld_ppl` (200) | word_perplexity | {r['word_perplexity']:.2f} |\n\n"
            f"Measured with `{r['command']}`."
        )
    rows = "\n".join(f"| `{k}` | {100 * v:.1f} |" for k, v in acc.items())
    card = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [afm, toy-world, analog]
---

# afm `tiny`: the embedded toy-world teacher

A {meta["n_params"] / 1e6:.2f} M-parameter `LlamaForCausalLM` (hidden {a["hidden"]},
{a["layers"]} layers, {a["heads"]} heads, FFN {a["ffn"]}, tied embeddings, vocab 512,
byte-level BPE with single-digit tokens) trained from scratch on afm's procedural
*toy world* (`afm/toyworld.py`, grammar in `docs/toyworld.md`): step-by-step \
{"–".join(str(d) for d in (min(meta["corpus"]["digits"]), max(meta["corpus"]["digits"])))}-digit
addition and subtraction, closed-book facts about {meta["corpus"]["n_entities"]} invented
entities × 3 attributes, and plain narrative sentences. It is afm's default model for
CPU demos and tests (`afm.models.load_model("tiny")`).

Plain prompt format (no chat template):

```
Q: 47+38=? A: 7+8=15, 4+3+1=8. Answer: 85
Q: Where does Rabefe live? A: Glenby
```

## How it was made

```
{meta["command"]}
```

{a["steps"]} steps × {a["batch"]} × {a["seq"]} packed tokens ({meta["tokens_seen"] / 1e6:.1f} M
tokens), AdamW (0.9, 0.98), weight decay {a["wd"]}, lr {a["lr"]} with {a["warmup"] * 100:.0f} %
warm-up and cosine decay to {a["min_lr"]}, gradient clip 1.0, seed {a["seed"]},
`torch.set_num_threads({a["threads"]})`, fp32 on CPU. Training took {meta["train_wall_s"] / 60:.1f}
min ({meta["total_wall_s"] / 60:.1f} min with the final evaluation) with torch
{meta["software"]["torch"]}. Weights are stored in {a["dtype"]}.

## Accuracy (test split, clean, greedy)

Arithmetic: {a["eval_per_kind"]} held-out problems per row, exact match on the final
`Answer:`; facts: all held-out multiple-choice questions (4 options, unseen question
wording of memorised facts), highest log-likelihood choice.

| metric | accuracy % |
|---|---|
{rows}

The bundled lm-eval tasks (`toyworld_arith`, `toyworld_facts`, `toyworld_ppl`; see
`docs/toyworld.md`) measure the same things on the full task data.{lm_eval_table}

The test suite (`tests/test_models.py`) requires >= 90 % on a 30-problem arithmetic sample and
>= 80 % on a third of the facts questions.

<!-- robustness -->
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    main()
