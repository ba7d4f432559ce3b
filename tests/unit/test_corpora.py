"""Language-model corpora of records (JSONL, Parquet, saved Hugging Face datasets): one document a
record, tokenised in one streaming pass into the token cache (hvdllm/data.py)."""
import csv
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_classify_data import write_saved_dataset

from hvdllm import data, records
from hvdllm.config import DataConfig
from hvdllm.errors import HvdllmError
from hvdllm.tokenizer import ByteTokenizer

SEP = ByteTokenizer().encode_array(data.SEPARATOR)


def texts(n, seed=0, size=60):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "epsilon ✓", "zeta\n", "eta", "theta"]
    return [" ".join(rng.choice(words, rng.integers(1, size))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def write_parquet(path, docs, field="text", row_group_size=7):
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def byte_tokens(docs):
    """What a one-document-a-record corpus must tokenise to: each text, then the separator."""
    enc = ByteTokenizer()
    return np.concatenate([np.concatenate([enc.encode_array(t), SEP]) for t in docs])


def cfg(corpus, **kw):
    return DataConfig(**{"corpus": [str(c) for c in corpus], "max_bytes": 0, "val_fraction": 0.1, **kw})


def tokens(td):
    return np.concatenate([np.asarray(td.train), np.asarray(td.val)])


def write_csv(path, docs):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(docs))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "dataset"])
def test_each_record_is_a_document_after_the_text_files_before_it(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(records, "ROWS_PER_BATCH", 5)      # several batches, numbered across them
    docs, head = texts(23), "a text file, one document\n"
    (tmp_path / "a.txt").write_text(head, encoding="utf-8")
    src = {"jsonl": lambda: write_jsonl(tmp_path / "b.jsonl", docs),
           "csv": lambda: write_csv(tmp_path / "b.csv", docs),
           "parquet": lambda: write_parquet(tmp_path / "b.parquet", docs),
           "dataset": lambda: write_saved_dataset(tmp_path / "ds", docs, list(range(len(docs))))}[fmt]()
    td = data.prepare(cfg([tmp_path / "a.txt", src]), 0, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(tokens(td), byte_tokens([head, *docs]))
    assert td.meta["n_files"] == 2 and td.meta["n_bytes"] == sum(len(t.encode()) for t in [head, *docs])
    assert [t for _, t in data.load_corpus([str(src)], 0)] == docs


def test_text_field_names_the_field(tmp_path):
    docs = texts(5)
    src = write_parquet(tmp_path / "b.parquet", docs, field="body")
    td = data.prepare(cfg([src], text_field="body"), 0, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(tokens(td), byte_tokens(docs))
    with pytest.raises(HvdllmError, match=r"b.parquet: no column 'text' \(columns: body, id\); set data.text_field"):
        data.prepare(cfg([src]), 0, cache_dir=tmp_path / "cache")


def put(path, raw: bytes):
    path.write_bytes(raw)
    return path


def _bad_jsonl(lines):
    return lambda p: put(p / "bad.jsonl", "".join(lines).encode())


BAD = {
    "missing field": (_bad_jsonl(['{"text": "ok"}\n', "\n", '{"body": "no text"}\n']),
                      r"bad.jsonl, line 3: no 'text' field \(set data.text_field"),
    "not a text": (_bad_jsonl(['{"text": "ok"}\n', '{"text": 5}\n']), r"bad.jsonl, line 2: 'text' is 5, not a text"),
    "not json": (_bad_jsonl(['{"text": "ok"}\n', '{"text": \n']), r"bad.jsonl, line 2: not a JSON object"),
    "empty file": (_bad_jsonl([]), r"bad.jsonl: no records \(the file is empty\); remove it from data.corpus"),
    "null in parquet": (lambda p: write_parquet(p / "bad.parquet", ["a", "b", "c", None], row_group_size=2),
                        r"bad.parquet, row 4: no 'text' field"),
    "unreadable parquet": (lambda p: put(p / "bad.parquet", b"PAR1 not really"),
                           r"bad.parquet: not a readable Parquet file"),
    "damaged arrow": (lambda p: put(write_saved_dataset(p / "ds", ["a"], [0]) / "data-00000-of-00001.arrow",
                                    b"\x00" * 3).parent, r"data-00000-of-00001.arrow: not a readable Arrow"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_records_are_one_message_naming_file_and_line_and_nothing_is_cached(tmp_path, case):
    make, message = BAD[case]
    (tmp_path / "a.txt").write_text("fine " * 50)
    bad = make(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(HvdllmError, match=message):
        data.prepare(cfg([tmp_path / "a.txt", bad]), 0, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []      # no folder, no leftover temp


def test_fingerprint_follows_the_field_and_the_records(tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", texts(5))
    (tmp_path / "a.txt").write_text("text")
    fp = data.corpus_fingerprint(cfg([src]))
    assert data.corpus_fingerprint(cfg([src], text_field="body")) != fp
    write_jsonl(src, texts(6))
    assert data.corpus_fingerprint(cfg([src])) != fp
    # a corpus of text files has no field: its cache key (and existing caches) stay as they were
    assert data.corpus_fingerprint(cfg([tmp_path / "a.txt"], text_field="body")) == \
        data.corpus_fingerprint(cfg([tmp_path / "a.txt"]))


def test_a_pattern_names_a_folder_of_shards_in_sorted_order(tmp_path):
    (tmp_path / "shards").mkdir()
    parts = [texts(4, seed=s) for s in range(3)]
    for i in (2, 0, 1):
        write_jsonl(tmp_path / "shards" / f"part-{i}.jsonl", parts[i])
    td = data.prepare(cfg([tmp_path / "shards" / "*.jsonl"]), 0, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(tokens(td), byte_tokens(parts[0] + parts[1] + parts[2]))
    with pytest.raises(HvdllmError, match=r"data.corpus: the pattern '.*\*.parquet' matches no file"):
        data.prepare(cfg([tmp_path / "shards" / "*.parquet"]), 0, cache_dir=tmp_path / "cache")


def test_a_saved_dataset_dict_names_its_splits(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(HvdllmError, match=r"DatasetDict with splits train, test: name a split's folder"):
        data.prepare(cfg([tmp_path / "dd"]), 0, cache_dir=tmp_path / "cache")


ALLOWANCE = 3 << 20


def big_corpus(tmp_path, fmt, n=11000):
    """~17 MB of distinct records (~1.6 KB each) as JSONL, or as Parquet in row groups of 500 rows
    written a group at a time (uncompressed, no dictionary: the file is as big as its texts)."""
    docs = texts(200, seed=1, size=400)
    if fmt == "jsonl":
        src = tmp_path / "big.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"text": docs[i % len(docs)] + f" {i}"}) + "\n")
        return src
    src = tmp_path / "big.parquet"
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(src, schema, compression="NONE", use_dictionary=False) as w:
        for lo in range(0, n, 500):
            w.write_table(pa.table({"text": [docs[i % len(docs)] + f" {i}" for i in range(lo, min(n, lo + 500))]},
                                   schema=schema))
    return src


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_streaming_pass_stays_under_a_memory_allowance(tmp_path, fmt):
    """A corpus over 4x the allowance is tokenised with the Python heap's peak (tracemalloc counts
    numpy's buffers too) and, for Parquet, Arrow's own pool's peak under it: neither the corpus
    nor its tokens are ever held at once."""
    src = big_corpus(tmp_path, fmt)
    assert src.stat().st_size > 4 * ALLOWANCE
    # a pool of its own for the build: the default pool's peak is lifelong (other tests, the writing)
    default_pool = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default_pool)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        td = data.prepare(cfg([src]), 0, cache_dir=tmp_path / "cache")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default_pool)
    assert td.meta["n_bytes"] > 4 * ALLOWANCE and (td.meta["n_train"] + td.meta["n_val"]) * 2 > 4 * ALLOWANCE
    assert peak < ALLOWANCE, f"peak {peak / 1e6:.1f} MB for a {src.stat().st_size / 1e6:.1f} MB corpus"
    if fmt == "parquet":
        arrow_peak = pool.max_memory()
        assert 0 < arrow_peak < ALLOWANCE, f"Arrow's pool peaked at {arrow_peak / 1e6:.1f} MB"
