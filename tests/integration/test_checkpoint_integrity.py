"""Checkpoints that check themselves and what they resume.

Damage: the manifest records each file's size and sha256 (computed while writing); a truncated or
bit-flipped shard is a CheckpointError naming the file, `latest()` falls back to the newest intact
checkpoint (saying so), and rewriting a step never leaves it missing.
Resume: the model, optimizer, seed, global batch, tokenizer and prepared tokens are compared with
the checkpoint's; train.resume_allow lets a run change some deliberately, and says so. fp16's loss
scale resumes with a ZeRO-3 run's sharded checkpoint.
`hvdllm generate` checks its config.toml against the checkpoint and uses the stored tokenizer.
"""
import hashlib
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from hvdllm import checkpoint, cli, config, metrics
from hvdllm.errors import CheckpointError
from hvdllm.tokenizer import BPETokenizer, ByteTokenizer

STATE = {"a": np.arange(4096, dtype=np.float32), "optim.step": np.array(3)}


def shard(tmp_path, step):
    return checkpoint.path_for(tmp_path, step) / checkpoint.shard_name(0, 0)


# -- damage ------------------------------------------------------------------------------------

def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    meta = {checkpoint.EXTRA_FILES: {checkpoint.TOKENIZER_FILE: ByteTokenizer().serialize()}}
    path = checkpoint.save(tmp_path, 1, STATE, meta)
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    assert sorted(files) == sorted([checkpoint.shard_name(0, 0), checkpoint.TOKENIZER_FILE])
    for name, rec in files.items():
        data = (path / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in path.iterdir()) == sorted([*files, checkpoint.MANIFEST])  # no sidecars
    assert isinstance(checkpoint.stored_tokenizer(path), ByteTokenizer)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_shard_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, damage):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, STATE, {})
    f = shard(tmp_path, 2)
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "bitflip":
        raw[len(raw) // 2] ^= 0x10            # inside the array's data: the zip still opens
        f.write_bytes(raw)
    else:
        f.unlink()
    assert checkpoint.latest(tmp_path) == checkpoint.path_for(tmp_path, 1)
    err = capsys.readouterr().err
    assert "step_00000002 is damaged" in err and "pp0-tp0.npz" in err and "falling back" in err
    # read directly, the damaged one is a CheckpointError naming the file (not a raw BadZipFile)
    with pytest.raises(CheckpointError, match="pp0-tp0.npz"):
        state, _ = checkpoint.load(checkpoint.path_for(tmp_path, 2))
        state["a"]


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, STATE, {})
        f = shard(tmp_path, step)
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        checkpoint.latest(tmp_path, log=False)
    assert "step_00000001" in str(e.value) and "step_00000002" in str(e.value)


def test_checkpoints_without_checksums_still_load_and_are_crc_checked(tmp_path):
    path = checkpoint.save(tmp_path, 1, STATE, {})
    m = json.loads((path / checkpoint.MANIFEST).read_text())
    del m["files"]                                    # as written before checksums
    (path / checkpoint.MANIFEST).write_text(json.dumps(m))
    assert checkpoint.latest(tmp_path) == path
    np.testing.assert_array_equal(checkpoint.load(path)[0]["a"], STATE["a"])
    raw = bytearray(shard(tmp_path, 1).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard(tmp_path, 1).write_bytes(raw)
    assert "CRC" in checkpoint.check(path)


def test_rewriting_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 3, {"a": np.zeros(2)}, {})
    final = checkpoint.path_for(tmp_path, 3)
    seen, real = [], shutil.rmtree

    def spy(p, *a, **k):   # the old folder is deleted only once the new one has the final name
        seen.append((final / checkpoint.MANIFEST).exists())
        return real(p, *a, **k)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", spy)
    checkpoint.save(tmp_path, 3, {"a": np.ones(2)}, {})
    assert seen == [True]
    np.testing.assert_array_equal(checkpoint.load(final)[0]["a"], 1)
    assert [p.name for p in final.parent.iterdir()] == [final.name]


# -- what a resume compares (in-process) -------------------------------------------------------

def run_cfg(*sets):
    return config.load(None, ["model.vocab_size=256", "train.batch_size=4", *sets])


def data_of(tokenizer=None, digest="d1"):
    return SimpleNamespace(tokenizer=tokenizer or ByteTokenizer(),
                           meta={"tokens_sha256": digest, "n_train": 1000, "n_val": 50})


def saved(tmp_path, cfg, dp=2, data=None):
    meta = {"config": cfg.to_dict(), **checkpoint.identity(cfg, SimpleNamespace(dp=dp), data or data_of())}
    path = checkpoint.save(tmp_path, 5, STATE, meta)
    return path, checkpoint.load(path)[1]


def check(path, meta, cfg, dp=2, data=None):
    return checkpoint.check_resume(path, meta, cfg, checkpoint.identity(cfg, SimpleNamespace(dp=dp),
                                                                         data or data_of()))


def test_resume_refuses_a_changed_setting_naming_it(tmp_path):
    path, meta = saved(tmp_path, run_cfg())
    with pytest.raises(CheckpointError) as e:
        check(path, meta, run_cfg("model.n_head=2", "optim.eps=1e-6"))
    msg = str(e.value)
    assert "model.n_head: 4 in the checkpoint, 2 now" in msg and "optim.eps" in msg
    assert "train.resume_allow" in msg and '"model.n_head"' in msg


def test_resume_compares_the_global_batch_not_the_layout(tmp_path):
    path, meta = saved(tmp_path, run_cfg(), dp=2)                                  # 2 x 4 x 1 = 8
    assert check(path, meta, run_cfg("train.batch_size=8"), dp=1) == []          # 1 x 8: same order
    assert check(path, meta, run_cfg("train.batch_size=2", "aggregation.accumulation=2"), dp=2) == []
    with pytest.raises(CheckpointError, match="train.batch_size: the global batch .* = 8 .* = 4"):
        check(path, meta, run_cfg(), dp=1)


def test_resume_compares_the_stored_tokenizer_and_the_tokens(tmp_path):
    texts = ["def f(x): return x + 1\n" * 50, "class A:\n    pass\n" * 50]
    bpe = BPETokenizer.train(texts, 300)
    path, meta = saved(tmp_path, run_cfg("model.vocab_size=300"), data=data_of(bpe))
    assert check(path, meta, run_cfg("model.vocab_size=300"), data=data_of(BPETokenizer.train(texts, 300))) == []
    retrained = BPETokenizer.train(texts + ["lambda y: y * 2\n" * 80], 300)        # a touched corpus
    with pytest.raises(CheckpointError, match="data.tokenizer: this run's tokenizer"):
        check(path, meta, run_cfg("model.vocab_size=300"), data=data_of(retrained))
    with pytest.raises(CheckpointError, match="data.corpus: the prepared tokens differ"):
        check(path, meta, run_cfg("model.vocab_size=300"), data=data_of(bpe, digest="d2"))


def test_resume_allow_lets_named_changes_through_and_reports_them(tmp_path):
    path, meta = saved(tmp_path, run_cfg())
    cfg = run_cfg("optim.lr=2e-3", "train.batch_size=8", 'train.resume_allow=["optim", "train.batch_size"]')
    changes = check(path, meta, cfg)
    assert any(c.startswith("optim.lr: 0.001 in the checkpoint, 0.002 now") for c in changes)
    assert any(c.startswith("train.batch_size: the global batch") for c in changes)
    with pytest.raises(CheckpointError, match="model.n_layer"):   # what is not allowed still refuses
        check(path, meta, run_cfg("optim.lr=2e-3", "model.n_layer=2", 'train.resume_allow=["optim.lr"]'))


def test_resume_allow_names_only_checked_settings():
    with pytest.raises(config.ConfigError, match="train.resume_allow: 'optim.lrr' is not a setting"):
        config.validate(run_cfg('train.resume_allow=["optim.lrr"]'), 1)


# -- real runs: resume and generate -------------------------------------------------------------

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=2",
        "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.max_bytes=0", "train.steps=2",
        "train.checkpoint_every=1", "train.eval_every=0", "train.eval_batches=1", "train.threads=1",
        "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=1"]


def hvdllm_one(args, cache, timeout=240):
    from launch_util import run
    return run([sys.executable, "-m", "hvdllm", *args], timeout, HVDLLM_CACHE=str(cache))


def sets(*kv):
    return [a for x in kv for a in ("--set", x)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny BPE run of 2 steps (checkpoints at steps 1 and 2) on its own small corpus."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["def", "return", "self", "import", "class", "for", "in", "range", "print", "lambda"]
    rng = np.random.default_rng(0)
    for i in range(3):
        (corpus / f"f{i}.py").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(400)))
    out = root / "out"
    r = hvdllm_one(["train", *sets(*TINY, f"data.corpus=['{corpus}']", f"train.out_dir={out}")], root / "cache")
    assert r.returncode == 0, r.stdout[-4000:]
    assert checkpoint.all_steps(out) == [1, 2]
    return root


def copy_run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.integration
def test_resume_refuses_a_changed_model_and_a_retrained_tokenizer(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = (run / "out" / "metrics.jsonl").read_text(), (run / "out" / "config.toml").read_text()
    with open(run / "corpus" / "f0.py", "a") as f:    # the corpus changes: BPE retrains another one
        f.write("\nwhile yield async await nonlocal global\n" * 200)
    r = hvdllm_one(["train", *sets(*TINY, f"data.corpus=['{run / 'corpus'}']", f"train.out_dir={run / 'out'}",
                                   "model.n_head=4", "train.steps=3", "train.resume=true")], run / "cache")
    assert r.returncode == 1, r.stdout[-4000:]
    assert "cannot resume from" in r.stdout and "model.n_head: 2 in the checkpoint, 4 now" in r.stdout
    assert "data.tokenizer: this run's tokenizer" in r.stdout and "Traceback" not in r.stdout
    assert ((run / "out" / "metrics.jsonl").read_text(), (run / "out" / "config.toml").read_text()) == before


@pytest.mark.integration
def test_resume_skips_a_damaged_checkpoint_and_says_what_it_changes(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    f = shard(run / "out", 2)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(raw)
    r = hvdllm_one(["train", *sets(*TINY, f"data.corpus=['{run / 'corpus'}']", f"train.out_dir={run / 'out'}",
                                   "optim.lr=2e-3", 'train.resume_allow=["optim.lr"]', "train.steps=3",
                                   "train.resume=true")], run / "cache")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "step_00000002 is damaged" in r.stdout and "(step 1)" in r.stdout
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in r.stdout
    assert [x["step"] for x in metrics.read(run / "out" / "metrics.jsonl") if "loss" in x][-2:] == [2, 3]


@pytest.mark.integration
def test_generate_uses_the_stored_tokenizer_without_the_corpus(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    toml = run / "out" / "config.toml"
    toml.write_text(toml.read_text().replace(str(trained / "corpus"), str(run / "corpus")))
    shutil.rmtree(run / "corpus")                     # the run's corpus and token cache are gone
    shutil.rmtree(run / "cache")
    r = hvdllm_one(["generate", str(run / "out"), "--tokens", "4", "--prompt", "def "], run / "cache")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "sampling from" in r.stdout and "step_00000002" in r.stdout
    assert not (run / "cache").exists()               # nothing prepared: the tokenizer came along


@pytest.mark.integration
def test_generate_refuses_a_config_that_does_not_match_the_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    toml = run / "out" / "config.toml"
    toml.write_text(toml.read_text().replace("n_head = 2", "n_head = 4"))
    assert cli.main(["generate", str(run / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.n_head is 4 there but 2 in the checkpoint" in err


@pytest.mark.integration
def test_fp16_loss_scale_resumes_from_a_sharded_checkpoint(tmp_path):
    """train.precision = 'fp16' under ZeRO-3 (a sharded checkpoint: the weights and moments are
    the engine's ranges): the overflow at step 1 (train.fail_mode = 'overflow') halves the scale,
    the manifest keeps it, and the resumed run goes on from the halved scale, not a fresh one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    run = [*TINY, "data.tokenizer=byte", f"data.corpus=['{corpus}']", f"train.out_dir={tmp_path / 'out'}",
           'train.precision="fp16"', "parallel.zero=3"]
    r = hvdllm_one(["train", *sets(*run, "train.fail_at_step=0", "train.fail_rank=0",
                                   'train.fail_mode="overflow"')], tmp_path / "cache")
    assert r.returncode == 0, r.stdout[-4000:]
    r = hvdllm_one(["train", *sets(*run, "train.steps=3", "train.resume=true")], tmp_path / "cache")
    assert r.returncode == 0, r.stdout[-4000:]
    recs = [(x["step"], x["skipped"], x["loss_scale"]) for x in metrics.read(tmp_path / "out" / "metrics.jsonl")
            if "loss" in x]
    assert recs == [(1, True, 2.0 ** 15), (2, False, 2.0 ** 15), (3, False, 2.0 ** 15)], recs
