"""Table corpora: local Parquet/Arrow files and Hugging Face datasets (offline: datasets built here)."""

import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import tables
from engine.data.corpus import corpus_files, corpus_hash, iter_contexts
from engine.model.tiny import tiny_tokenizer

from tests.engine.runs_util import LINES

VOCAB = 384


def _rows(n_rows: int, lengths, seed: int = 0) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, VOCAB, size=int(lengths[i % len(lengths)])).tolist() for i in range(n_rows)]


def _pack(rows: list[list[int]], context_len: int) -> list[list[int]]:
    """Independent packing: one flat stream, cut into whole windows."""
    flat = [t for r in rows for t in r]
    return [flat[i : i + context_len] for i in range(0, len(flat) - context_len + 1, context_len)]


def test_pretokenized_parquet_gives_exactly_the_stored_rows(tmp_path):
    tok = tiny_tokenizer()
    rows = _rows(10, [16])
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())), "id": list(range(10))}),
                   tmp_path / "c.parquet", row_group_size=3)  # several row groups
    assert list(iter_contexts(tok, tmp_path / "c.parquet", 16)) == rows  # no separator, no BOS: exactly the rows
    assert list(iter_contexts(tok, f"hf:{tmp_path / 'c.parquet'}", 16)) == rows
    assert corpus_files(tmp_path / "c.parquet") == [tmp_path / "c.parquet"]


def test_pretokenized_rows_of_any_length_are_concatenated_unchanged(tmp_path):
    tok = tiny_tokenizer()
    rows = _rows(13, [5, 30, 1, 9])
    (tmp_path / "d").mkdir()
    for part, chunk in enumerate((rows[:6], rows[6:])):  # two files, read in name order
        pq.write_table(pa.table({"tokens": pa.array(chunk, pa.list_(pa.int64()))}), tmp_path / "d" / f"part-{part}.parquet")
    got = list(iter_contexts(tok, tmp_path / "d", 8))
    assert got == _pack(rows, 8) and len(got) >= 5


def test_arrow_stream_and_file_formats(tmp_path):
    tok = tiny_tokenizer()
    rows = _rows(6, [12])
    table = pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))})
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)
    assert list(iter_contexts(tok, tmp_path / "file.arrow", 12)) == rows
    assert list(iter_contexts(tok, tmp_path / "stream.arrow", 12)) == rows


def test_datasets_save_to_disk_and_splits(tmp_path):
    import datasets  # in the test extra
    tok = tiny_tokenizer()
    train, test = _rows(4, [8], seed=1), _rows(3, [8], seed=2)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"input_ids": train}),
        "test": datasets.Dataset.from_dict({"input_ids": test}),
    }).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_contexts(tok, tmp_path / "saved", 8)) == train  # the default split
    assert list(iter_contexts(tok, f"hf:{tmp_path / 'saved'}:test", 8)) == test
    with pytest.raises(ValueError, match="no split 'dev'"):
        corpus_files(f"hf:{tmp_path / 'saved'}:dev")


def test_text_column_is_tokenized_like_jsonl(tmp_path):
    tok = tiny_tokenizer()
    docs = LINES * 2
    pq.write_table(pa.table({"text": docs, "meta": [1] * len(docs)}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    expected = list(iter_contexts(tok, tmp_path / "t.jsonl", 16))
    assert list(iter_contexts(tok, tmp_path / "t.parquet", 16)) == expected and len(expected) > 3
    assert list(iter_contexts(tok, f"hf:{tmp_path / 't.parquet'}::text", 16)) == expected


def test_hub_route_through_datasets_matches_pyarrow(tmp_path):
    """The hf: path streams through ``datasets.load_dataset`` (here on a local folder laid out as a hub dataset)."""
    import datasets  # noqa: F401  (in the test extra)
    for name in ("tok", "txt"):
        (tmp_path / name / "data").mkdir(parents=True)
    rows, held = _rows(9, [8, 4]), _rows(2, [8], seed=3)
    for split, chunk in (("train", rows), ("test", held)):
        pq.write_table(pa.table({"input_ids": pa.array(chunk, pa.list_(pa.int32()))}),
                       tmp_path / "tok" / "data" / f"{split}-00000.parquet")
    pq.write_table(pa.table({"text": LINES}), tmp_path / "txt" / "data" / "train-00000.parquet")
    spec = tables.TableSpec(str(tmp_path / "tok"), "train", None, hub=True)
    column, arrays = tables.open_stream(spec)
    assert column == tables.Column("input_ids", "tokens")
    assert [r.tolist() for r in tables.token_rows(spec, column, arrays, VOCAB)] == rows
    column, arrays = tables.open_stream(spec._replace(split="test"))
    assert [r.tolist() for r in tables.token_rows(spec, column, arrays, VOCAB)] == held
    text_spec = tables.TableSpec(str(tmp_path / "txt"), None, None, hub=True)
    column, arrays = tables.open_stream(text_spec)
    assert list(tables.texts(text_spec, column, arrays)) == LINES
    with pytest.raises(ValueError, match=r"cannot open Hugging Face dataset .*\(split 'dev'\): .*Bad split"):
        tables.open_stream(spec._replace(split="dev"))
    with pytest.raises(ValueError, match=r"no column 'nope' \(columns: input_ids\)"):
        tables.open_stream(spec._replace(column="nope"))


def test_missing_column_wrong_type_and_no_usable_column(tmp_path):
    tok = tiny_tokenizer()
    pq.write_table(pa.table({"text": ["a b"], "n": [3], "f": pa.array([[1.5]], pa.list_(pa.float32()))}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text, n, f\)"):
        list(iter_contexts(tok, f"hf:{tmp_path / 'x.parquet'}::body", 4))
    with pytest.raises(ValueError, match="column 'n' holds int64, expected text .* or token ids"):
        list(iter_contexts(tok, f"hf:{tmp_path / 'x.parquet'}::n", 4))
    with pytest.raises(ValueError, match="column 'f' holds list<.*float>"):
        list(iter_contexts(tok, f"hf:{tmp_path / 'x.parquet'}::f", 4))
    pq.write_table(pa.table({"n": [3]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="no text, input_ids or tokens column"):
        list(iter_contexts(tok, tmp_path / "y.parquet", 4))
    with pytest.raises(ValueError, match="expected hf:NAME"):
        corpus_files("hf:a:b:c:d")


def test_token_ids_outside_the_vocabulary(tmp_path):
    tok = tiny_tokenizer()
    rows = _rows(5, [6])
    rows[3][2] = VOCAB + 7
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "big.parquet")
    with pytest.raises(ValueError, match=rf"row 3 of column 'input_ids' holds token id {VOCAB + 7}, outside .* {VOCAB} ids"):
        list(iter_contexts(tok, tmp_path / "big.parquet", 6))
    pq.write_table(pa.table({"input_ids": [[1, -2]]}), tmp_path / "neg.parquet")
    with pytest.raises(ValueError, match="token id -2"):
        list(iter_contexts(tok, tmp_path / "neg.parquet", 2))


def test_hub_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"saescope\[hf\].*local Parquet/Arrow files need nothing extra"):
        corpus_files("hf:someone/some-dataset")
    with pytest.raises(ValueError, match=r"saescope\[hf\]"):
        list(iter_contexts(tiny_tokenizer(), "hf:someone/some-dataset", 8))


def test_unreachable_or_unknown_hub_dataset_fails_fast(monkeypatch, tmp_path):
    import datasets  # in the test extra
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 (the tests' default) sets it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="cannot open Hugging Face dataset 'no-such-owner/no-such-dataset'"):
        list(iter_contexts(tiny_tokenizer(), "hf:no-such-owner/no-such-dataset", 8))
    assert time.perf_counter() - started < 10


def test_unreachable_hub_fails_in_seconds(monkeypatch):
    import socket

    import datasets  # in the test extra
    import huggingface_hub.constants
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=rf"cannot reach the Hugging Face hub at http://127.0.0.1:{port} to stream dataset"):
        list(iter_contexts(tiny_tokenizer(), "hf:o/d", 8))
    assert time.perf_counter() - started < 10


def test_mixed_directory_and_hashes(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "m" / "a.parquet")
    (tmp_path / "m" / "b.txt").write_text("b")
    with pytest.raises(ValueError, match="mixes text files and Parquet/Arrow"):
        corpus_files(tmp_path / "m")
    (tmp_path / "m" / "b.txt").unlink()
    first = corpus_hash(tmp_path / "m")
    pq.write_table(pa.table({"text": ["c"]}), tmp_path / "m" / "a.parquet")
    assert corpus_hash(tmp_path / "m") != first
    assert corpus_hash("hf:o/d:train:text") == corpus_hash("hf:o/d::text") != corpus_hash("hf:o/d:test:text")


def test_precompute_on_a_pretokenized_corpus_stores_exactly_its_rows(tiny_llama, tmp_path):
    from engine.precompute.pipeline import precompute

    from tests.engine.saes_util import random_sae

    rows = _rows(12, [16], seed=4)
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), tmp_path / "tok.parquet")
    spec = f"hf:{tmp_path / 'tok.parquet'}::input_ids"
    manifest = precompute(tiny_llama, random_sae("standard", hook="blocks.0.hook_resid_post"), spec, tmp_path / "run",
                          context_len=16, batch_size=4, top_k=3, sample_contexts=2, progress=False)
    stored = pq.read_table(tmp_path / "run" / "contexts.parquet").sort_by("context_id").column("token_ids").to_pylist()
    assert stored == rows
    assert manifest["corpus"]["path"] == spec and manifest["corpus"]["n_contexts"] == 12
