"""Data pipeline: corpus, tokenizers, the token cache, and the rank-disjoint sampler."""
import math
import time

import numpy as np
import pytest

from hvdllm import data
from hvdllm.config import DataConfig
from hvdllm.errors import HvdllmError, PeerTimeout
from hvdllm.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer

TOKENS = np.arange(10_000, dtype=np.uint16) % 251      # 1249 windows of 8 (+1) tokens


def sampler(D=1, r=0, b=4, seed=0, **kw):
    return data.Sampler(TOKENS, 8, b, D, r, seed, **kw)


def starts(x):
    """Window index of each row (TOKENS is a ramp mod 251, so the first two tokens identify it)."""
    return {int(row[0]) * 1000 + int(row[1]) for row in x}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    words = ["def", "return", "self", "import", "class", "for", "in", "range", "print", "lambda"]
    rng = np.random.default_rng(0)
    for i in range(6):
        text = "\n".join(" ".join(rng.choice(words, 8)) + f" # Zeile {i} ünïcode ✓" for _ in range(300))
        (root / ("sub" if i % 2 else ".") / f"f{i}.py").write_text(text, encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00" * 100)      # not a text suffix: ignored in folders
    return root


def cfg(corpus, **kw):
    return DataConfig(**{"corpus": [str(corpus)], "max_bytes": 200_000, "val_fraction": 0.1, **kw})


# -- sampler -----------------------------------------------------------------------------------

def test_sampler_is_deterministic_and_shapes():
    a, b = sampler(D=2, r=1, seed=7), sampler(D=2, r=1, seed=7)
    for step in (0, 3, 500):
        (xa, ya), (xb, yb) = a.batch(step), b.batch(step)
        assert xa.shape == ya.shape == (4, 8) and xa.dtype == ya.dtype == np.int64
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])   # y is x shifted by one
    assert not np.array_equal(sampler(seed=1).batch(0)[0], sampler(seed=2).batch(0)[0])


def test_ranks_are_disjoint_within_an_epoch():
    D = 3
    ss = [sampler(D=D, r=r) for r in range(D)]
    seen = [np.concatenate([s.windows(step) for step in range(s.steps_per_epoch)]) for s in ss]
    allw = np.concatenate(seen)
    assert len(allw) == len(set(allw.tolist())) == ss[0].steps_per_epoch * D * 4


def test_union_over_ranks_depends_only_on_global_batch():
    one = sampler(D=1, b=4, seed=3)
    two = [sampler(D=2, r=r, b=2, seed=3) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch
    for step in (0, 1, 17, one.steps_per_epoch + 2):
        union = set().union(*(set(s.windows(step).tolist()) for s in two))
        assert union == set(one.windows(step).tolist())
        assert starts(np.concatenate([s.batch(step)[0] for s in two])) == starts(one.batch(step)[0])


def test_epochs_reshuffle_and_no_shuffle_is_in_order():
    s = sampler(b=1)                    # 1249 windows, b=1: every window is used in each epoch
    n = s.steps_per_epoch
    assert not np.array_equal(s.windows(0), s.windows(n))
    e0 = np.concatenate([s.windows(i) for i in range(n)])
    e1 = np.concatenate([s.windows(n + i) for i in range(n)])
    assert set(e0.tolist()) == set(e1.tolist()) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(sampler(shuffle=False).windows(1), [4, 5, 6, 7])


def test_sampler_too_small_names_the_keys():
    with pytest.raises(HvdllmError, match="train.batch_size.*model.block_size|model.block_size.*train.batch_size"):
        data.Sampler(np.zeros(50, np.uint16), 8, 4, 2, 0, 0)


def test_eval_batches_split_and_cap():
    val = np.arange(200, dtype=np.uint16)                   # 24 windows of 8
    got = [list(data.eval_batches(val, 8, 2, 2, r, 3)) for r in range(2)]
    assert len(got[0]) == len(got[1]) == 3
    assert got[0][0][0][:, 0].tolist() == [0, 16] and got[1][0][0][:, 0].tolist() == [8, 24]
    assert len(list(data.eval_batches(val, 8, 2, 2, 0, 100))) == 6      # only 6 global batches fit
    with pytest.raises(HvdllmError, match="data.val_fraction"):
        list(data.eval_batches(val[:20], 8, 2, 2, 0, 1))


def test_unigram_entropy():
    uniform = np.tile(np.arange(256, dtype=np.uint16), 100)
    assert data.unigram_entropy(uniform) == pytest.approx(math.log(256))
    assert data.unigram_entropy(np.zeros(10, np.uint16)) == 0.0


# -- tokenizers --------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'ünïcode ✓'\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode([0xff, 65]) == "\ufffdA"                 # invalid UTF-8 is shown, not raised


def test_bpe_tokenizer_round_trip_and_cache(corpus, tmp_path):
    texts = [t for _, t in data.load_corpus([str(corpus)], 0)]
    c = cfg(corpus, tokenizer="bpe", bpe_vocab_size=300)
    tok = get_tokenizer(c, texts, tmp_path)
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 300
    sample = "def f(self):\n    return lambda x: x  # ünïcode ✓ 日本 \t\n"
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode()) and tok.decode(ids) == sample
    again = get_tokenizer(c, None, tmp_path)                    # loaded from tokenizer.json
    assert again.encode(sample) == ids and again.name == tok.name
    retrained = get_tokenizer(c, texts, None)                   # training is deterministic
    assert retrained.encode(texts[0]) == tok.encode(texts[0])


# -- corpus and cache --------------------------------------------------------------------------

def test_load_corpus_order_cap_and_errors(corpus, tmp_path):
    docs = data.load_corpus([str(corpus)], 0)
    assert [n for n, _ in docs] == ["corpus/f0.py", "corpus/f2.py", "corpus/f4.py",
                                    "corpus/sub/f1.py", "corpus/sub/f3.py", "corpus/sub/f5.py"]
    capped = data.load_corpus([str(corpus)], 5000)
    assert sum(len(t.encode()) for _, t in capped) <= 5000 + 3 * len(capped)   # + replacement chars
    assert [n for n, _ in data.load_corpus([str(corpus / "skip.bin")], 0)] == ["skip.bin"]
    with pytest.raises(HvdllmError, match="data.corpus"):
        data.load_corpus([str(tmp_path / "nope")], 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HvdllmError, match="data.corpus"):
        data.load_corpus([str(tmp_path / "empty")], 0)


def test_stdlib_default_corpus():
    docs = data.load_corpus([], 100_000)
    names = [n for n, _ in docs]
    assert names and names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n or "__pycache__" in n for n in names)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_writes_cache_then_reuses_it(corpus, tmp_path, kind):
    c = cfg(corpus, tokenizer=kind, bpe_vocab_size=300)
    d = data.prepare(c, 0, cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / data.corpus_fingerprint(c)
    assert {p.name for p in folder.iterdir()} >= {"train.bin", "val.bin", "meta.json"}
    assert list((tmp_path / "cache").iterdir()) == [folder]     # no temp folders left
    assert d.train.dtype == np.uint16 and not d.train.flags.writeable
    m = d.meta
    assert m["n_train"] == len(d.train) and m["n_val"] == len(d.val) and m["n_files"] == 6
    assert m["vocab_size"] == d.tokenizer.vocab_size and m["tokenizer"] == d.tokenizer.name
    assert m["n_val"] == pytest.approx(0.1 * (m["n_train"] + m["n_val"]), abs=1)
    assert int(d.train.max()) < d.tokenizer.vocab_size
    assert d.tokenizer.decode(d.train[:50]) in (corpus / "f0.py").read_text()
    mtime = (folder / "train.bin").stat().st_mtime_ns
    time.sleep(0.01)
    d2 = data.prepare(c, 1, cache_dir=tmp_path / "cache", timeout_s=0.5)   # another rank: reuses
    assert (folder / "train.bin").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(d2.train, d.train)
    assert d2.tokenizer.encode("def x") == d.tokenizer.encode("def x")


def test_fingerprint_tracks_settings_and_files(corpus):
    base = data.corpus_fingerprint(cfg(corpus))
    assert base == data.corpus_fingerprint(cfg(corpus))
    assert base != data.corpus_fingerprint(cfg(corpus, val_fraction=0.2))
    assert base != data.corpus_fingerprint(cfg(corpus, tokenizer="bpe"))
    (corpus / "f0.py").write_text("changed")
    assert base != data.corpus_fingerprint(cfg(corpus))


def test_other_rank_times_out_when_rank0_never_prepares(corpus, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match="rank 0") as e:
        data.prepare(cfg(corpus), 1, cache_dir=tmp_path / "cache", timeout_s=0.5)
    assert time.monotonic() - t0 < 5 and str(tmp_path / "cache") in str(e.value)


def test_env_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HVDLLM_CACHE", str(tmp_path))
    assert data.default_cache_dir(DataConfig()) == tmp_path / "data"
    assert data.default_cache_dir(DataConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"
