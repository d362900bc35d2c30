"""Own data: the user's corpus packed into rows, datasets-native shard directories."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest

from afm import toyworld as tw
from afm.training.corpus import load_corpus, mix_rows, pack, prepare_corpus, read_documents
from afm.training.data import generate_synthetic_data
from afm.training.data_config import CorpusConfig, DataError, SyntheticDataConfig
from afm.training.shards import load_rows, load_synthetic_data, write_index

DOCS = list(itertools.islice(tw.training_documents(), 60))
SEQ = 16


@pytest.fixture(scope="module")
def tok(toy_llama):
    return toy_llama()[1]


def _expected_rows(tok, docs=DOCS):
    stream = []
    for d in docs:
        stream += tok(d).input_ids + [tok.eos_token_id]
    return [stream[i : i + SEQ] for i in range(0, len(stream) - SEQ + 1, SEQ)]


def _packed(cfg, tok, out):
    prepare_corpus(cfg, tok, out, seq_len=SEQ)
    return load_corpus(out)["input_ids"]


def test_pack_cuts_full_rows_and_counts_the_rest():
    counts: dict[str, int] = {}
    rows = list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, counts))
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert counts == {"documents": 3, "dropped_tokens": 1}


def test_every_source_gives_the_same_rows(tok, tmp_path):
    from datasets import Dataset, DatasetDict

    want = _expected_rows(tok)
    assert len(want) > 20 and all(len(r) == SEQ for r in want)
    src = tmp_path / "src"
    (src / "jsonl").mkdir(parents=True)
    for i, part in enumerate((DOCS[:30], DOCS[30:])):  # a directory of two files
        (src / "jsonl" / f"p{i}.jsonl").write_text(
            "".join(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(part))
        )
    (src / "all.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    (src / "all.txt").write_text("\n".join(DOCS) + "\n")
    Dataset.from_dict({"body": DOCS}).to_parquet(str(src / "all.parquet"))
    Dataset.from_dict({"text": DOCS}).save_to_disk(str(src / "saved"))
    DatasetDict({"validation": Dataset.from_dict({"text": DOCS})}).save_to_disk(str(src / "dd"))
    cases = {
        "dir": CorpusConfig(path=str(src / "jsonl")),
        "glob": CorpusConfig(path=str(src / "jsonl" / "*.jsonl")),
        "json": CorpusConfig(path=str(src / "all.json"), text_column="body"),
        "txt": CorpusConfig(path=str(src / "all.txt")),
        "parquet": CorpusConfig(path=str(src / "all.parquet"), text_column="body"),
        "saved": CorpusConfig(path=str(src / "saved")),
        "dict": CorpusConfig(path=str(src / "dd"), split="validation"),
    }
    for name, cfg in cases.items():
        assert _packed(cfg, tok, tmp_path / name) == want, name


def test_chat_messages_use_the_chat_template(tok, tmp_path):
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    chats = [
        [{"role": "user", "content": d}, {"role": "assistant", "content": DOCS[i + 1]}]
        for i, d in enumerate(DOCS[:20])
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    rows = _packed(CorpusConfig(path=str(path), messages_column="messages"), tok, tmp_path / "o")
    stream = []
    for c in chats:
        text = tok.apply_chat_template(c, tokenize=False)
        assert text.count("assistant: ") == 1
        stream += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert rows == [stream[i : i + SEQ] for i in range(0, len(stream) - SEQ + 1, SEQ)]
    tok.chat_template = None  # a copy: the shared fixture keeps its (absent) template
    with pytest.raises(DataError, match="corpus.messages_column='messages' needs a tokenizer"):
        prepare_corpus(
            CorpusConfig(path=str(path), messages_column="messages"), tok, tmp_path / "x", seq_len=8
        )


def test_local_files_stream_and_shards_bound_memory(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    docs = read_documents(CorpusConfig(path=str(path)))
    assert type(docs).__name__ == "IterableDataset"  # read as a stream, never loaded whole
    cfg = CorpusConfig(path=str(path), rows_per_shard=4, max_tokens=10 * SEQ)
    stats = prepare_corpus(cfg, tok, tmp_path / "o", seq_len=SEQ)
    assert stats["sequences"] == 10 and stats["shards"] == 3  # 4 + 4 + 2 rows
    assert load_corpus(tmp_path / "o")["input_ids"] == _expected_rows(tok)[:10]
    # the same recipe is reused, another one refused
    assert prepare_corpus(cfg, tok, tmp_path / "o", seq_len=SEQ) == stats
    with pytest.raises(DataError, match="another recipe"):
        prepare_corpus(cfg, tok, tmp_path / "o", seq_len=SEQ * 2)


def test_corpus_errors_name_the_key(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "a b c"}) + "\n")
    out = tmp_path / "o"
    with pytest.raises(DataError, match=r"corpus.text_column='text' is not a column .*content"):
        prepare_corpus(CorpusConfig(path=str(path)), tok, out, seq_len=SEQ)
    with pytest.raises(DataError, match="no full row"):
        prepare_corpus(CorpusConfig(path=str(path), text_column="content"), tok, out, seq_len=SEQ)
    with pytest.raises(DataError, match="corpus.path='no-such/dataset-xyz' is neither"):
        prepare_corpus(CorpusConfig(path="no-such/dataset-xyz"), tok, out, seq_len=SEQ)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text("{}\n")
    (tmp_path / "mixed" / "b.txt").write_text("x\n")
    with pytest.raises(DataError, match="must all be one of"):
        prepare_corpus(CorpusConfig(path=str(tmp_path / "mixed")), tok, out, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"corpus.mix=0 is invalid"):
        CorpusConfig(path="x", mix=0)


def test_mix_rows_meets_the_stated_ratio():
    from datasets import Dataset

    corpus = Dataset.from_dict({"input_ids": [[1, i] for i in range(30)]})
    synth = Dataset.from_dict({"input_ids": [[2, i] for i in range(100)]})
    mixed = mix_rows(corpus, synth, 0.25)
    firsts = [r[0] for r in mixed["input_ids"]]
    assert len(mixed) == 120 and firsts.count(1) == 30 and firsts.count(2) == 90
    mixed = mix_rows(corpus, synth, 0.75)  # the synthetic side limits it now
    firsts = [r[0] for r in mixed["input_ids"]]
    assert firsts.count(2) / len(mixed) == pytest.approx(0.25, abs=0.01) and firsts.count(1) == 30
    assert mix_rows(corpus, synth, 1.0) is corpus


def test_synthetic_data_directory_is_a_datasets_artefact(toy_llama, tmp_path):
    import datasets

    model, tok = toy_llama(max_positions=64)
    cfg = SyntheticDataConfig(num_tokens=2 * 4 * 8, seq_len=8, sequences_per_shard=4, batch_size=4)
    generate_synthetic_data(model.eval(), tok, tmp_path / "d", cfg, progress=False)
    rows = load_synthetic_data(tmp_path / "d")["input_ids"]
    native = datasets.load_from_disk(str(tmp_path / "d"))
    # the default data.targets=top_k stores the cached teacher targets beside the tokens
    assert native.column_names == ["input_ids", "top_k_ids", "top_k_logprobs"]
    assert native["input_ids"] == rows and len(rows) == 8
    # a directory written before the index (format 1) still loads, and can be indexed
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "d", old)
    for name in ("state.json", "dataset_info.json", "README.md"):
        (old / name).unlink()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(old))
    assert load_synthetic_data(old)["input_ids"] == rows
    write_index(old)
    assert datasets.load_from_disk(str(old))["input_ids"] == rows


def test_data_dir_takes_any_saved_dataset_with_input_ids(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}).save_to_disk(str(tmp_path / "ids"))
    assert load_rows(tmp_path / "ids")["input_ids"] == [[1, 2, 3]] * 4
    Dataset.from_dict({"text": ["a b"] * 4}).save_to_disk(str(tmp_path / "texts"))
    with pytest.raises(DataError, match=r"no 'input_ids' column \(columns: text\).*corpus.path="):
        load_rows(tmp_path / "texts")
