"""Integration tier: short real training runs under mpirun / horovodrun, compared step by step."""
import time

import numpy as np
import pytest

from hvdllm import metrics
from launch_util import hvdllm

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "data.max_bytes=400000", "train.steps=6", "train.eval_every=3", "train.eval_batches=2",
        "train.threads=1", "train.sample_tokens=8", "train.progress=false", "optim.warmup_steps=2",
        "train.checkpoint_every=3", "optim.lr=3e-3"]


def train(tmp_path, name, np_=1, sets=(), launcher="mpirun", timeout=300):
    out = tmp_path / name
    args = ["train"] + [a for kv in [*TINY, f"train.out_dir={out}", *sets] for a in ("--set", kv)]
    r = hvdllm(np_, args, timeout=timeout, launcher=launcher)
    return r, out


def losses(out, key="loss"):
    return np.array([r[key] for r in metrics.read(out / "metrics.jsonl") if key in r])


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_dp_equals_single_process(tmp_path, backend):
    """np=2 with micro-batch b reproduces np=1 with batch 2b (and np=4 with b/2)."""
    r1, single = train(tmp_path, "np1", 1, [f"backend={backend}", "train.batch_size=8"])
    assert r1.returncode == 0, r1.stdout[-4000:]
    r2, dp2 = train(tmp_path, "np2", 2, [f"backend={backend}", "train.batch_size=4"])
    assert r2.returncode == 0, r2.stdout[-4000:]
    r4, dp4 = train(tmp_path, "np4", 4, [f"backend={backend}", "train.batch_size=2"])
    assert r4.returncode == 0, r4.stdout[-4000:]
    ref = losses(single)
    assert len(ref) == 6 and ref[-1] < ref[0]
    # float32 sums in another order: differences stay ~1e-6 relative over 6 AdamW steps.
    np.testing.assert_allclose(losses(dp2), ref, rtol=2e-4)
    np.testing.assert_allclose(losses(dp4), ref, rtol=2e-4)
    np.testing.assert_allclose(losses(dp2, "val_loss"), losses(single, "val_loss"), rtol=2e-4)
    assert (dp2 / "loss.png").stat().st_size > 1000 and (dp2 / "sample.txt").exists()
    assert (dp2 / "checkpoints" / "step_00000006" / "manifest.json").exists()


@pytest.mark.integration
def test_dp_under_horovodrun_gloo(tmp_path):
    r1, single = train(tmp_path, "np1", 1, ["train.batch_size=8"])
    r2, gloo = train(tmp_path, "gloo", 2, ["train.batch_size=4"], launcher="horovodrun")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stdout[-4000:]
    np.testing.assert_allclose(losses(gloo), losses(single), rtol=2e-4)


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_resume_equals_uninterrupted(tmp_path, backend):
    sets = [f"backend={backend}", "train.batch_size=4"]
    r, full = train(tmp_path, "full", 2, sets)
    assert r.returncode == 0, r.stdout[-4000:]
    # Crash after the step-3 checkpoint, then resume: the losses must be the uninterrupted ones.
    r, part = train(tmp_path, "part", 2, sets + ["train.fail_at_step=4", "train.fail_rank=1"])
    assert r.returncode != 0 and "injected failure" in r.stdout
    r, part = train(tmp_path, "part", 2, sets + ["train.resume=true"])
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resumed from" in r.stdout
    got = losses(part)
    assert len(got) == 6
    np.testing.assert_allclose(got, losses(full), rtol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_one_failing_rank_ends_every_rank(tmp_path, launcher):
    t0 = time.monotonic()
    r, _ = train(tmp_path, "fail", 2, ["train.fail_at_step=2", "train.fail_rank=1", "train.batch_size=4"],
                 launcher=launcher, timeout=180)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "[hvdllm] rank 1 failed" in r.stdout and "train.fail_at_step" in r.stdout
    assert elapsed < 150, f"took {elapsed:.0f}s to end the job"


@pytest.mark.integration
def test_bad_config_exits_2_on_every_rank_before_writing(tmp_path):
    r, out = train(tmp_path, "bad", 2, ["model.n_embd=33", "parallel.dp=5", "backend=jax"])
    assert r.returncode == 2, r.stdout[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: invalid configuration (3 problem(s))" in r.stdout
    assert "model.n_embd" in r.stdout and "parallel.dp" in r.stdout and "backend" in r.stdout
    assert not out.exists()
