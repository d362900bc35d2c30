"""Cached sparse teacher targets: generation (HF, vLLM), shards, resume, the trainer."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from afm.training.data import generate_synthetic_data
from afm.training.data_config import DataError, SyntheticDataConfig
from afm.training.shards import load_synthetic_data
from afm.training.teacher_targets import CachedTargets, TargetSpec, stored_forms

K, N, L = 5, 6, 12
CFG = SyntheticDataConfig(
    num_tokens=2 * 8 * L,
    seq_len=L,
    sequences_per_shard=8,
    batch_size=4,
    targets="both",
    targets_k=K,
    targets_samples=N,
)


@pytest.fixture(scope="module")
def teacher(toy_llama):
    model, tok = toy_llama(max_positions=128)
    return model.eval(), tok


@pytest.fixture(scope="module")
def with_targets(teacher, tmp_path_factory):
    model, tok = teacher
    out = tmp_path_factory.mktemp("targets")
    generate_synthetic_data(model, tok, out, CFG, progress=False)
    return load_synthetic_data(out)


def _teacher_logp(model, row):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(row)[None]).logits[0].float(), -1)


def test_targets_are_the_teachers_distribution_at_every_position(teacher, with_targets):
    model, _ = teacher
    assert stored_forms(with_targets) == ("top_k", "sampled")
    for r in range(len(with_targets)):
        row = with_targets[r]
        logp = _teacher_logp(model, row["input_ids"])  # [L, V], the live teacher's target
        values, ids = logp.topk(K, -1)
        np.testing.assert_array_equal(np.reshape(row["top_k_ids"], (L, K)), ids.numpy())
        np.testing.assert_allclose(np.reshape(row["top_k_logprobs"], (L, K)), values, atol=4e-3)
        entropy = -(logp.exp() * logp).sum(-1)
        np.testing.assert_allclose(row["entropy"], entropy, atol=1e-4)
        sampled = np.reshape(row["sampled_ids"], (L, N))
        w = np.reshape(row["sampled_weights"], (L, N)).astype(np.float32)
        np.testing.assert_allclose(w, 1 / N, rtol=1e-3)  # proposal = teacher: weights 1/n
        # drawn from p: no id of (numerically) zero teacher probability
        assert (logp.gather(1, torch.from_numpy(sampled).long()) > -30).all()


def test_tokens_are_those_of_a_run_without_targets(teacher, with_targets, tmp_path):
    model, tok = teacher
    plain = SyntheticDataConfig(**{**CFG.recipe(), "targets": "none"})
    generate_synthetic_data(model, tok, tmp_path, plain, progress=False)
    plain_ds = load_synthetic_data(tmp_path)
    assert plain_ds.column_names == ["input_ids"]
    assert plain_ds["input_ids"] == with_targets["input_ids"]
    assert "targets" not in plain.recipe()  # directories written before targets still match


def test_resume_gives_the_same_targets(teacher, with_targets, tmp_path):
    model, tok = teacher
    generate_synthetic_data(model, tok, tmp_path, CFG, max_shards=1, progress=False)
    generate_synthetic_data(model, tok, tmp_path, CFG, progress=False)
    again = load_synthetic_data(tmp_path)
    for col in with_targets.column_names:
        assert again[col] == with_targets[col], col


def test_pack_mode_and_prompts_align_targets_with_tokens(teacher, tmp_path):
    model, tok = teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nseven plus two is\n")
    width = 40
    cfg = SyntheticDataConfig(
        **{**CFG.recipe(), "seq_len": width, "eos": "pack", "prompts_file": str(prompts),
           "targets": "top_k"}
    )  # fmt: skip
    generate_synthetic_data(model, tok, tmp_path / "d", cfg, max_shards=1, progress=False)
    row = load_synthetic_data(tmp_path / "d", require_complete=False)[0]
    ids = np.reshape(row["top_k_ids"], (width, K))
    n_prompt = 1 + len(tok("the cat", add_special_tokens=False).input_ids)
    assert (ids[: n_prompt - 1] == -1).all()  # prompt tokens before the last: no target
    # the first document: up to the next document's BOS
    starts = [i for i, t in enumerate(row["input_ids"]) if t == tok.bos_token_id]
    end = starts[1] if len(starts) > 1 else width
    assert end > n_prompt + 2
    logp = _teacher_logp(model, row["input_ids"][:end])  # the document alone
    np.testing.assert_array_equal(ids[n_prompt - 1 : end], logp.topk(K, -1).indices[n_prompt - 1 :])


def test_cached_targets_batch(with_targets):
    top = CachedTargets(with_targets, "top_k")
    t_ids, w, c, valid = top.batch([0, 3], L + 2)  # two positions of padding
    assert t_ids.shape == (2, L + 2, K) and w.shape == (2, L + 2, K) and c.shape == (2, L + 2)
    assert valid[:, :L].all() and not valid[:, L:].any()
    torch.testing.assert_close(w[:, :L].sum(-1), torch.ones(2, L))  # renormalised over k
    assert (w[:, L:] == 0).all() and (t_ids >= 0).all()
    sam = CachedTargets(with_targets, "sampled")
    _, w, c, _ = sam.batch([1], L)
    assert (c < 0).all() and torch.allclose(w.sum(-1), torch.ones(1, L), atol=1e-2)
    plain = with_targets.select_columns(["input_ids"])
    with pytest.raises(DataError, match="holds no 'sampled' teacher targets"):
        CachedTargets(plain, "sampled")


def test_shard_columns_are_what_datasets_makes_of_the_arrays(tmp_path):
    """write_shard builds the target columns from one concatenation and its offsets;
    rows of different lengths must read back exactly as datasets' own conversion."""
    from datasets import Dataset, Features, load_from_disk

    from afm.training.shards import shard_name, write_shard
    from afm.training.teacher_targets import COLUMNS, target_features

    spec = TargetSpec(("top_k", "sampled"), k=3, samples=2)
    rng = np.random.default_rng(0)
    lengths = [4, 1, 7]
    rows = [rng.integers(0, 50, n).tolist() for n in lengths]
    targets = [  # every column, in its stored dtype
        {c: rng.normal(size=(n, spec.width(c))).astype(COLUMNS[c][1]) for c in spec.columns()}
        for n in lengths
    ]
    write_shard(tmp_path, 0, rows, targets, spec)
    got = load_from_disk(str(tmp_path / shard_name(0)))
    feats = Features({"input_ids": got.features["input_ids"], **target_features(spec)})
    columns = {c: [t[c].reshape(-1) for t in targets] for c in spec.columns()}
    want = Dataset.from_dict({"input_ids": rows, **columns}, features=feats)
    assert got.features == want.features
    assert got.data.schema.types == want.data.schema.types
    for c in ["input_ids", *spec.columns()]:
        assert got[c] == want[c], c


def test_bytes_per_token():
    spec = TargetSpec(("top_k", "sampled"), k=12, samples=12)
    assert spec.bytes_per_token() == 12 * (4 + 2) + 12 * (4 + 2) + 4


def test_config_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="data.targets='soft' is invalid"):
        SyntheticDataConfig(targets="soft")
    with pytest.raises(ValueError, match="data.targets_samples=0 is invalid"):
        SyntheticDataConfig(targets_samples=0)
    model, tok = teacher
    big = SyntheticDataConfig(**{**CFG.recipe(), "targets": "top_k", "targets_k": 10_000})
    with pytest.raises(DataError, match="targets_k=10000 is larger than the vocabulary"):
        generate_synthetic_data(model, tok, tmp_path, big, progress=False)


def test_vllm_backend_stores_its_top_k_logprobs(monkeypatch):
    """vLLM's per-token logprobs (a {id: Logprob} per generated token, the sampled
    token added to the top k) become the top-k columns; sampled needs the hf backend."""
    from afm.training import data as data_mod

    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    lp = types.SimpleNamespace

    def step(best):  # the top 2 and the sampled token (id 9, ranked lower)
        return {best: lp(logprob=-0.1), 4: lp(logprob=-2.0), 9: lp(logprob=-5.0)}

    gen = [7, 8, 3, 5]  # max_new = 3 plus the extra step for the last kept token
    out = types.SimpleNamespace(token_ids=gen, logprobs=[step(t) for t in gen])

    class LLM:
        def generate(self, prompts, params, use_tqdm):
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    cfg = SyntheticDataConfig(seq_len=4, targets="top_k", targets_k=2, backend="vllm")
    seqs, targets = data_mod._vllm_sample(LLM(), [[1]], 3, cfg, 0, TargetSpec.from_config(cfg))
    assert seen["logprobs"] == 2 and seen["max_tokens"] == 4
    assert seqs == [[1, 7, 8, 3]]
    np.testing.assert_array_equal(targets[0]["top_k_ids"], [[7, 4], [8, 4], [3, 4], [5, 4]])
    out.logprobs = None  # a vLLM that ignored the request: refused, not "no target"
    with pytest.raises(DataError, match="vLLM returned no logprobs"):
        data_mod._vllm_sample(LLM(), [[1]], 3, cfg, 0, TargetSpec.from_config(cfg))
    with pytest.raises(DataError, match="needs data.backend='hf'"):
        data_mod.sampling_backend(SyntheticDataConfig(targets="sampled", backend="vllm"))
    monkeypatch.setattr(data_mod, "resolve_backend", lambda cfg: "vllm")
    assert data_mod.sampling_backend(SyntheticDataConfig(targets="both")) == "hf"  # auto


def test_distill_without_a_teacher(teacher, with_targets, tmp_path):
    from afm.training.distill import distill, make_student
    from afm.training.distill_config import DistillConfig

    model, tok = teacher
    cfg = DistillConfig(
        max_steps=4, per_device_batch_size=4, lr=3e-3, calibration_batches=1, save_steps=None
    )
    losses = {}
    for form in ("top_k", "sampled", "live"):
        student = make_student(model, "afm-paper")
        c = DistillConfig(**{**cfg.__dict__, "kd_targets": form})
        res = distill(
            None if form != "live" else model, student, with_targets, c, tmp_path / form,
            pad_id=tok.pad_token_id, progress=False,
        )  # fmt: skip
        assert res.steps == 4 and res.skipped_steps == 0
        losses[form] = res.final_loss
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert len(set(losses.values())) == 3  # three different targets
    with pytest.raises(ValueError, match="needs the live teacher"):
        distill(None, make_student(model), with_targets.select_columns(["input_ids"]), cfg,
                tmp_path / "x", progress=False)  # fmt: skip
    hot = DistillConfig(**{**cfg.__dict__, "temperature": 2.0})
    with pytest.raises(ValueError, match="train.temperature=2.0 is invalid with cached"):
        distill(None, make_student(model), with_targets, hot, tmp_path / "y", progress=False)


def test_afm_train_uses_cached_targets_without_a_teacher(teacher, tmp_path, monkeypatch):
    from afm.cli import train as train_cli
    from afm.training import run as run_mod

    model, tok = teacher
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    teachers = []
    real = run_mod.distill

    def spy(t, *args, **kwargs):
        teachers.append(t)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(run_mod, "distill", spy)
    small = [
        "--set", "data.num_tokens=256", "--set", "data.seq_len=16",
        "--set", "data.sequences_per_shard=16", "--set", "data.batch_size=16",
        "--set", "train.max_steps=2", "--set", "train.per_device_batch_size=4",
        "--set", "train.calibration_batches=1", "--set", "num_threads=1",
    ]  # fmt: skip
    for targets, expect_teacher in (("sampled", False), ("none", True)):
        out = tmp_path / targets
        rc = train_cli.main(
            ["--model", str(model_dir), "--output", str(out), "--quiet", *small,
             "--set", f"data.targets={targets}"]
        )  # fmt: skip
        assert rc == 0
        assert (teachers[-1] is not None) == expect_teacher
