"""Record corpora under MPI: the ranks tokenise disjoint files and rank 0 joins them in file
order, so the cache is a one-process build's byte for byte; a bad record on any rank's share
fails every rank with its message; and training on a JSONL corpus at np=2 equals np=1."""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from launch_util import mpirun_argv, run, same_run, train

from hvdllm import data
from hvdllm.config import DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_classify_data import write_saved_dataset  # noqa: E402
from test_corpora import texts, write_jsonl, write_parquet  # noqa: E402

CACHED = ("train.bin", "val.bin", "tokenizer.json")


def two_shard_dataset(folder, docs):
    """A saved dataset of two Arrow shards (the ranks split it by shard)."""
    write_saved_dataset(folder, docs[:len(docs) // 2], [0] * (len(docs) // 2))
    table = pa.table({"text": docs[len(docs) // 2:], "label": [0] * (len(docs) - len(docs) // 2)})
    with pa.OSFile(str(folder / "data-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"},
                                                                   {"filename": "data-00001.arrow"}]}))
    return folder


def corpus(root: Path) -> list[str]:
    (root / "a.txt").write_text(" ".join(texts(30, seed=5)), encoding="utf-8")
    (root / "e.md").write_text("# a markdown file\n" * 40, encoding="utf-8")
    return [str(p) for p in (root / "a.txt", write_jsonl(root / "b.jsonl", texts(80, seed=1)),
                             write_parquet(root / "c.parquet", texts(70, seed=2), row_group_size=9),
                             two_shard_dataset(root / "ds", texts(50, seed=3)), root / "e.md")]


@pytest.mark.parallel
def test_a_build_across_ranks_is_the_one_process_build_and_a_bad_record_fails_every_rank(tmp_path):
    files = corpus(tmp_path)
    bad = tmp_path / "bad.jsonl"        # file 1: rank 1's share
    bad.write_text('{"text": "fine"}\n{"txt": "a typo"}\n', encoding="utf-8")
    kinds = {"byte": dict(corpus=files, max_bytes=0, val_fraction=0.1),
             "bpe": dict(corpus=files, max_bytes=0, val_fraction=0.1, tokenizer="bpe", bpe_vocab_size=300),
             "bad": dict(corpus=[files[0], str(bad), *files[1:]], max_bytes=0),
             "unshared": dict(corpus=files, max_bytes=0, own_cache=True, timeout_s=3)}
    (tmp_path / "corpora.json").write_text(json.dumps(kinds))
    r = run(mpirun_argv(3) + [sys.executable, "tests/parallel/check_corpus_build.py", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stdout[-4000:]
    got = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert len(got) == 12, r.stdout[-4000:]
    for name in ("byte", "bpe"):
        ref = data.prepare(DataConfig(**kinds[name]), 0, cache_dir=tmp_path / f"np1-{name}", comm=None).meta
        caches = {g["cache"] for g in got if g["corpus"] == name}
        assert len(caches) == 1, got
        cache = Path(caches.pop())
        for f in CACHED:
            if (Path(ref["cache"]) / f).exists():
                assert (cache / f).read_bytes() == (Path(ref["cache"]) / f).read_bytes(), (name, f)
        meta = json.loads((cache / "meta.json").read_text())
        assert {k: v for k, v in meta.items()} == {k: v for k, v in ref.items() if k != "cache"}, name
        assert not list(cache.parent.glob(".*")), list(cache.parent.iterdir())     # no parts left
    errors = [g.get("error") for g in got if g["corpus"] == "bad"]
    assert errors == [f"HvdllmError: {bad}, line 2: no 'text' field (set data.text_field if the records call "
                      f"it otherwise)"] * 3
    assert not list((tmp_path / "np3-bad").iterdir())
    # nodes that do not share the cache folder: rank 0 misses the others' parts, they time out; all say why
    unshared = {g["rank"]: g.get("error", "") for g in got if g["corpus"] == "unshared"}
    assert "b.jsonl was tokenised by another rank" in unshared[0] and "every rank shares" in unshared[0], unshared
    for rank in (1, 2):
        assert unshared[rank].startswith("PeerTimeout: waited 3s") and "must be a shared folder" in unshared[rank]


@pytest.mark.integration
def test_training_on_a_jsonl_corpus_at_np2_equals_np1(tmp_path):
    """np=2 builds its own cache (a file on each rank) and trains with b=4 like np=1 with b=8."""
    a, b = write_jsonl(tmp_path / "a.jsonl", texts(800, seed=7)), write_jsonl(tmp_path / "b.jsonl", texts(700, seed=8))
    sets = ["backend=torch", f"data.corpus=['{a}', '{b}']"]
    r1, ref = train(tmp_path, "np1", 1, sets + ["train.batch_size=8", f"data.cache_dir={tmp_path / 'c1'}"])
    assert r1.returncode == 0, r1.stdout[-4000:]
    r2, dp2 = train(tmp_path, "np2", 2, sets + ["train.batch_size=4", f"data.cache_dir={tmp_path / 'c2'}"])
    assert r2.returncode == 0, r2.stdout[-4000:]
    same_run(dp2, ref, rtol=1e-5, what="np2 on a JSONL corpus")
    (a,), (b,) = (tmp_path / "c1").glob("*/train.bin"), (tmp_path / "c2").glob("*/train.bin")
    assert a.read_bytes() == b.read_bytes()
