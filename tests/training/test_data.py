"""Synthetic data: per-shard seeding, worker-count independence, resume, EOS modes, errors."""

from __future__ import annotations

import json

import pytest
import torch

from afm.training.batches import pad_collate
from afm.training.data import generate_synthetic_data
from afm.training.data_config import DataError, SyntheticDataConfig, shard_seed
from afm.training.shards import data_stats, load_synthetic_data


@pytest.fixture(scope="module")
def teacher(toy_llama):
    model, tok = toy_llama(max_positions=128)
    return model.eval(), tok


CFG = SyntheticDataConfig(num_tokens=3 * 8 * 12, seq_len=12, sequences_per_shard=8, batch_size=4)


def _rows(path):
    return load_synthetic_data(path)["input_ids"]


def test_shard_seed_is_stable_and_distinct():
    assert shard_seed(0, 1) == shard_seed(0, 1)
    assert len({shard_seed(s, i) for s in range(3) for i in range(50)}) == 150


def test_result_does_not_depend_on_worker_count(teacher, tmp_path):
    model, tok = teacher
    one = generate_synthetic_data(model, tok, tmp_path / "one", CFG, progress=False)
    assert one["complete"] and one["shards"] == CFG.num_shards == 3
    for rank in (1, 0):  # two workers, any order
        generate_synthetic_data(
            model, tok, tmp_path / "two", CFG, rank=rank, world_size=2, progress=False
        )
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
    rows = _rows(tmp_path / "one")
    assert len(rows) == 24 and all(len(r) == 12 and r[0] == tok.bos_token_id for r in rows)
    assert len({tuple(r) for r in rows}) > 20  # sampled, not one repeated sequence


def test_worker_generates_only_its_shards(teacher, tmp_path):
    model, tok = teacher
    st = generate_synthetic_data(model, tok, tmp_path, CFG, rank=1, world_size=2, progress=False)
    assert st["generated"] == 1 and not st["complete"]
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00001"]
    assert not (tmp_path / "stats.json").exists()
    with pytest.raises(DataError, match="1 of 3 shards"):
        load_synthetic_data(tmp_path)


def test_resume_continues_at_the_next_missing_shard(teacher, tmp_path):
    model, tok = teacher
    full = tmp_path / "full"
    generate_synthetic_data(model, tok, full, CFG, progress=False)
    part = tmp_path / "part"
    st = generate_synthetic_data(model, tok, part, CFG, max_shards=1, progress=False)
    assert st["shards"] == 1 and not st["complete"]
    (part / ".shard-00001.tmp-999").mkdir()  # debris of a killed worker is ignored
    st = generate_synthetic_data(model, tok, part, CFG, progress=False)
    assert st["generated"] == 2 and st["complete"]
    assert _rows(part) == _rows(full)
    stats = json.loads((part / "stats.json").read_text())
    assert stats["tokens"] == 24 * 12 and stats["sequences"] == 24
    assert stats["mean_length"] == pytest.approx(12.0)
    again = generate_synthetic_data(model, tok, part, CFG, progress=False)
    assert again["generated"] == 0 and _rows(part) == _rows(full)


def test_different_seed_gives_different_data(teacher, tmp_path):
    model, tok = teacher
    other = SyntheticDataConfig(**{**CFG.recipe(), "seed": 1})
    generate_synthetic_data(model, tok, tmp_path / "a", CFG, max_shards=1, progress=False)
    generate_synthetic_data(model, tok, tmp_path / "b", other, max_shards=1, progress=False)
    assert (
        load_synthetic_data(tmp_path / "a", require_complete=False)["input_ids"]
        != (load_synthetic_data(tmp_path / "b", require_complete=False)["input_ids"])
    )


def test_pack_mode_rows_are_full_and_ignore_mode_samples_past_eos(teacher, tmp_path):
    model, tok = teacher

    # Make EOS likely so that documents end early.
    def boost(_module, _args, out):
        out = out.clone()
        out[..., tok.eos_token_id] += 4.0
        return out

    handle = model.lm_head.register_forward_hook(boost)
    try:
        packed = SyntheticDataConfig(**{**CFG.recipe(), "eos": "pack"})
        generate_synthetic_data(model, tok, tmp_path / "p", packed, progress=False)
        rows = _rows(tmp_path / "p")
        assert len(rows) == 24 and all(len(r) == 12 for r in rows)
        assert any(tok.eos_token_id in r[:-1] for r in rows)
        # packed: an EOS is followed by the next document's BOS
        for r in rows:
            for i, x in enumerate(r[:-1]):
                if x == tok.eos_token_id:
                    assert r[i + 1] == tok.bos_token_id
        generate_synthetic_data(model, tok, tmp_path / "i", CFG, progress=False)
        rows = _rows(tmp_path / "i")
        assert all(len(r) == 12 for r in rows)  # sampling went on past EOS
        assert any(tok.eos_token_id in r[:-1] for r in rows)
    finally:
        handle.remove()


def test_prompts_file(teacher, tmp_path):
    model, tok = teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: 12+34=? A:\n\nAnna walked\n")
    cfg = SyntheticDataConfig(**{**CFG.recipe(), "prompts_file": str(prompts)})
    generate_synthetic_data(model, tok, tmp_path / "d", cfg, progress=False)
    rows = _rows(tmp_path / "d")
    p0 = [tok.bos_token_id, *tok("Q: 12+34=? A:", add_special_tokens=False).input_ids]
    p1 = [tok.bos_token_id, *tok("Anna walked", add_special_tokens=False).input_ids]
    assert rows[0][: len(p0)] == p0 and rows[1][: len(p1)] == p1
    assert all(len(r) <= 12 for r in rows)


def test_errors(teacher, tmp_path):
    model, tok = teacher
    with pytest.raises(DataError, match="does not exist"):
        load_synthetic_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no shards"):
        load_synthetic_data(tmp_path / "empty")
    generate_synthetic_data(model, tok, tmp_path / "x", CFG, max_shards=1, progress=False)
    other = SyntheticDataConfig(**{**CFG.recipe(), "temperature": 0.5})
    with pytest.raises(DataError, match="different recipe"):
        generate_synthetic_data(model, tok, tmp_path / "x", other, progress=False)
    with pytest.raises(DataError, match="prompts file"):
        cfg = SyntheticDataConfig(**{**CFG.recipe(), "prompts_file": str(tmp_path / "nope")})
        generate_synthetic_data(model, tok, tmp_path / "y", cfg, progress=False)
    with pytest.raises(ValueError, match="data.eos"):
        SyntheticDataConfig(eos="stop")
    with pytest.raises(ValueError, match="data.top_p"):
        SyntheticDataConfig(top_p=1.5)
    with pytest.raises(ValueError, match="data.num_tokens"):
        SyntheticDataConfig(num_tokens=0)


def test_vllm_backend_is_refused_without_vllm_and_gpu(teacher, tmp_path):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("vLLM and a GPU are present")
    except ImportError:
        pass
    model, tok = teacher
    cfg = SyntheticDataConfig(**{**CFG.recipe(), "backend": "vllm"})
    with pytest.raises(DataError, match="vLLM"):  # bad input: one line from the CLIs
        generate_synthetic_data(model, tok, tmp_path, cfg, progress=False)


def test_stats_and_collate(teacher, tmp_path):
    model, tok = teacher
    generate_synthetic_data(model, tok, tmp_path, CFG, max_shards=2, progress=False)
    st = data_stats(tmp_path)
    assert st == {"shards": 2, "sequences": 16, "tokens": 192, "mean_length": 12.0}
    batch = pad_collate([[1, 2, 3], [4]], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
