"""Helpers shared by the tests (importable as ``helpers``: tests/ is on the path).

* :func:`tiny_llama_for` — a tiny random Llama sized for a tokenizer;
* :func:`run_two_ranks` — launch a worker script on 2 CPU processes with torchrun (gloo),
  for the engine tests;
* :func:`load_script` — a script of ``scripts/`` as a module (the drills share their
  tables with the tests).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]

#: ``--set`` flags that make an ``afm-train`` run on a tiny model take seconds.
SMALL_TRAIN_SETS = [
    "--set", "data.num_tokens=512",
    "--set", "data.seq_len=16",
    "--set", "data.sequences_per_shard=16",
    "--set", "data.batch_size=16",
    "--set", "train.max_steps=3",
    "--set", "train.per_device_batch_size=4",
    "--set", "train.calibration_batches=1",
    "--set", "train.save_steps=2",
    "--set", "num_threads=1",
]  # fmt: skip


def state_snapshot(model) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor of ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_llama_for(tokenizer, *, max_positions=64, kv_heads=4, tie=False, seed=0):
    """A tiny random Llama sized for ``tokenizer`` (special token ids taken from it)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: Path, *args: str, timeout: int = 900) -> None:
    """``torchrun --nproc_per_node 2 script args``; asserts a zero exit (stderr tail shown)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def load_script(name: str):  # noqa: ANN201
    """``scripts/<name>.py`` imported as a module (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(
        f"afm_script_{name}", REPO / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
