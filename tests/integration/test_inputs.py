"""Inputs that used to crash with a raw exception, or pass silently: each is one message naming
what to fix, a non-zero exit (2 for configuration errors), and nothing written."""
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from launch_util import mpirun_argv, run

from hvdllm import cli, config, data
from hvdllm.config import DataConfig
from hvdllm.errors import ConfigError, PeerTimeout


def problems(*sets, world_size=1):
    with pytest.raises(ConfigError) as e:
        config.validate(config.load(None, list(sets)), world_size)
    return str(e.value)


# -- settings (validate) -----------------------------------------------------------------------

@pytest.mark.parametrize("sets, key", [
    (["train.steps=0"], "train.steps: must be >= 1"),
    (["train.step_timeout=0"], "train.step_timeout: must be a finite number > 0"),
    (["train.step_timeout=-5"], "train.step_timeout: must be a finite number > 0"),
    (["optim.eps=0"], "optim.eps: must be a finite number > 0"),
    (["optim.eps=-1e-8"], "optim.eps: must be a finite number > 0"),
    (["optim.eps=nan"], "optim.eps: must be a finite number > 0"),
    (["aggregation.fusion_threshold_mb=-1"], "aggregation.fusion_threshold_mb: must be >= 0"),
    (["aggregation.cycle_time_ms=-0.5"], "aggregation.cycle_time_ms: must be >= 0"),
    (["train.fail_rank=2"], "train.fail_rank: 2 is not a rank of this job (ranks 0..1)"),
    (["train.fail_rank=-1"], "train.fail_rank: -1 is not a rank"),
    (["data.corpus=[1, 2]"], "data.corpus: entries must be paths as non-empty strings, got 1"),
    (["model.vocab_size=100"], "model.vocab_size: 100 is smaller than the byte tokenizer's vocabulary of 256"),
])
def test_bad_setting_named(sets, key):
    msg = problems(*sets, world_size=2)
    assert key in msg and "1 problem(s)" in msg


def test_vocab_size_zero_or_large_enough_is_fine():
    for v in (0, 256, 300):
        config.validate(config.load(None, [f"model.vocab_size={v}"]), 1)
    # BPE: its size is known once trained; the trainer checks it then (vocab_problems)
    cfg = config.load(None, ["data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=280"])
    config.validate(cfg, 1)
    assert "model.vocab_size: 280 is smaller than the bpe tokenizer's vocabulary of 290" in \
        config.vocab_problems(cfg, 290)[0]
    assert config.vocab_problems(cfg, 280) == []


def test_out_dir_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/run", "afile/a/b"):
        msg = problems(f"train.out_dir={tmp_path / out}")
        assert f"train.out_dir: {tmp_path / 'afile'} is a file, not a folder" in msg
    config.validate(config.load(None, [f"train.out_dir={tmp_path / 'new' / 'run'}"]), 1)


@pytest.mark.parametrize("order", [["model=3", "model.n_layer=2"], ["model.n_layer=2", "model=3"]])
def test_a_table_given_a_value_and_keys(order):
    with pytest.raises(ConfigError) as e:
        config.load(None, order)
    assert "model is a table of settings" in str(e.value)


def test_config_path_that_is_a_folder_unreadable_or_not_utf8(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is a folder"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[train]\nout_dir = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .*save it as UTF-8"):
        config.load(bad)
    locked = tmp_path / "locked.toml"
    locked.write_text("[train]\nsteps = 3\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", denied)       # root reads any file: simulate the mode
    with pytest.raises(ConfigError, match="cannot be read \\(Permission denied\\); check its permissions"):
        config.load(locked)


@pytest.mark.parametrize("argv, key", [
    (["--set", "train.steps=0"], "train.steps"),
    (["--set", "model=3", "--set", "model.n_layer=2"], "model is a table of settings"),
    (["CFG_DIR"], "is a folder"),
    (["--set", "train.out_dir=FILE/run"], "is a file, not a folder"),
])
def test_cli_exits_2_with_the_message_and_writes_nothing(tmp_path, capsys, monkeypatch, argv, key):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "CFG_DIR").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert key in err and "invalid configuration" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- the token cache ---------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 300)
    return root


def test_truncated_token_cache_is_rebuilt(corpus, tmp_path, capsys):
    c = DataConfig(corpus=[str(corpus)], max_bytes=0, val_fraction=0.1)
    d = data.prepare(c, 0, cache_dir=tmp_path / "cache")
    want = np.array(d.train)
    folder = Path(d.meta["cache"])
    (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:1000])   # e.g. a full disk
    # another rank waits for rank 0 to rebuild it, and says what to delete if that never happens
    with pytest.raises(PeerTimeout, match=re.escape("damaged (train.bin has 1000 bytes") + ".*" +
                       re.escape(f"delete {folder}")):
        data.prepare(c, 1, cache_dir=tmp_path / "cache", timeout_s=0.3)
    capsys.readouterr()
    again = data.prepare(c, 0, cache_dir=tmp_path / "cache")
    assert "damaged (train.bin has 1000 bytes" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train, want)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]
    assert len(again.meta["tokens_sha256"]) == 64


# -- a corpus that differs between nodes (two MPI ranks, each with its own copy) ---------------

SCRIPT = textwrap.dedent("""
    import sys
    from mpi4py import MPI
    from hvdllm import data
    from hvdllm.config import DataConfig
    base, r = sys.argv[1], MPI.COMM_WORLD.Get_rank()
    c = DataConfig(corpus=[f"{base}/node{r}/corpus"], max_bytes=0, val_fraction=0.1, cache_dir=f"{base}/cache")
    try:
        d = data.prepare(c, r, timeout_s=20)
        print(f"rank {r}: ok {d.meta['cache']}", flush=True)
    except Exception as e:
        print(f"rank {r}: {type(e).__name__}: {e}", flush=True)
    MPI.COMM_WORLD.Barrier()   # both have printed before either leaves
""")


def two_nodes(tmp_path, edit=None):
    for r in (0, 1):
        root = tmp_path / f"node{r}" / "corpus"
        root.mkdir(parents=True)
        for i in range(3):
            (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 300)
        os.utime(root / "f0.py", ns=(10**18 + r * 10**9, 10**18 + r * 10**9))   # other mtimes per node
    if edit:
        edit(tmp_path / "node1" / "corpus")
    return run(mpirun_argv(2) + [sys.executable, "-c", SCRIPT, str(tmp_path)], timeout=120)


def other_sizes(root):
    (root / "f1.py").write_text("def other():\n    pass\n" * 300)
    (root / "extra.py").write_text("x = 1\n")


def same_size_other_bytes(root):
    f = root / "f2.py"
    f.write_text(f.read_text().replace("return", "RETURN"))


@pytest.mark.parametrize("edit", [other_sizes, same_size_other_bytes])
def test_corpus_differing_between_nodes_is_named_on_every_rank(tmp_path, edit):
    r = two_nodes(tmp_path, edit)
    for rank in (0, 1):
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith(f"rank {rank}:")), r.stdout)
        assert "HvdllmError: data.corpus" in line and "differs between ranks" in line, r.stdout
    assert "rank 1 on " in r.stdout
    if edit is other_sizes:
        sizes = [(tmp_path / f"node{n}" / "corpus" / "f1.py").stat().st_size for n in (0, 1)]
        assert f"corpus/f1.py has {sizes[0]} bytes on rank 0, {sizes[1]} here" in r.stdout
        assert "corpus/extra.py not on rank 0" in r.stdout
    else:
        assert "corpus/f2.py has other contents (same size)" in r.stdout
    assert not (tmp_path / "cache").exists()          # nothing written: no rank went on to build


def test_identical_copies_with_other_mtimes_share_rank0s_cache(tmp_path):
    r = two_nodes(tmp_path)
    oks = [ln.split(" ok ")[1] for ln in r.stdout.splitlines() if " ok " in ln]
    assert r.returncode == 0 and len(oks) == 2, r.stdout
    assert len(set(oks)) == 1 and len(list((tmp_path / "cache").iterdir())) == 1


# -- a diverging run: the message, no traceback ------------------------------------------------

@pytest.mark.integration
def test_diverging_run_is_a_message_not_a_traceback(tmp_path):
    from launch_util import run as run_cmd
    out = tmp_path / "out"
    sets = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
            "train.batch_size=2", "data.max_bytes=60000", "train.steps=4", "train.eval_every=0",
            "train.threads=1", "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=0",
            "optim.lr=1e30", "optim.min_lr=1e30", "optim.grad_clip=0", f"train.out_dir={out}"]
    r = run_cmd([sys.executable, "-m", "hvdllm", "train", *[a for s in sets for a in ("--set", s)]], 240,
                HVDLLM_CACHE=str(tmp_path / "cache"))
    assert r.returncode != 0
    assert "loss became" in r.stdout and "lower optim.lr" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stdout, r.stdout[-3000:]


@pytest.mark.integration
def test_model_vocab_smaller_than_a_trained_bpe_exits_2_before_writing(corpus, tmp_path):
    """validate knows only the byte tokenizer's size; a trained BPE's is checked by the trainer
    once the corpus is prepared (before: an IndexError from the embedding, or zeros under tp)."""
    out = tmp_path / "out"
    sets = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=2",
            "data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=260", f"data.corpus=['{corpus}']",
            "data.max_bytes=0", "train.steps=2", "train.eval_every=0", "train.threads=1", "train.sample_tokens=0",
            "train.progress=false", f"train.out_dir={out}"]
    r = run([sys.executable, "-m", "hvdllm", "train", *[a for s in sets for a in ("--set", s)]], 240,
            HVDLLM_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 2, r.stdout[-3000:]
    assert "model.vocab_size: 260 is smaller than the bpe tokenizer's vocabulary" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stdout and not out.exists()
