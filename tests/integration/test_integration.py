"""Integration tier: short real training runs under mpirun / horovodrun, compared step by step
with the one-process run: losses, gradient norms (logged before clipping, so a wrong gradient
scale shows even where clipping and Adam's scale invariance hide it from the loss) and
validation losses. The np=1 references are shared by the session (conftest.py `reference`)."""
import re
import time

import pytest
from launch_util import losses, records, same_run, train

BACKENDS = ["torch", "tensorflow"]
NO_CLIP = "optim.grad_clip=0"   # TINY's gradient norm is ~2: optim.grad_clip=1 clips every step


@pytest.mark.integration
@pytest.mark.parametrize("backend,clip", [("torch", []), ("tensorflow", [NO_CLIP])],
                         ids=["torch-clip1", "tensorflow-noclip"])
def test_dp_equals_single_process_and_resumes_after_a_crash(tmp_path, reference, backend, clip):
    """np=2 with micro-batch b reproduces np=1 with batch 2b (torch with clipping, TensorFlow
    without, each against np=1 with the same optim.grad_clip); torch's np=4 with b/2 without
    clipping does too. (TensorFlow at np=4: its collectives in tests/parallel/check_*.py; with
    clipping at np=2: test_optimizer_parallel.py's predivide, an average by another route.)
    Then rank 1 fails after the step-3 checkpoint: every rank ends at once, with the failed
    rank's message, and train.resume=true continues from step 3 with the uninterrupted run's
    numbers."""
    b = f"backend={backend}"
    ref = reference(b, "train.batch_size=8", *clip)
    got = losses(ref)
    assert len(got) == 6 and got[-1] < got[0]
    sets = [b, "train.batch_size=4", *clip]
    r, dp2 = train(tmp_path, "np2", 2, sets + ["train.plot=true", "train.tensorboard=true"])
    assert r.returncode == 0, r.stdout[-4000:]
    # float32 sums in another order: measured 1e-7 relative over 6 AdamW steps, held to 1e-5 as pp and tp are
    same_run(dp2, ref, rtol=1e-5, what="np2")
    assert (dp2 / "loss.png").stat().st_size > 1000 and (dp2 / "sample.txt").exists()
    # MFU against the ranks' measured matmul peak: a figure above 1 would be a measurement bug
    assert all(0 < x["mfu"] <= 1 for x in records(dp2) if "loss" in x), [x.get("mfu") for x in records(dp2)]
    assert "MFU:" in r.stdout and "GFLOP/s per trainer rank x 2" in r.stdout
    # every trainer's peak in training, gathered at the end (hvdllm bench plan reads this line)
    peak = re.search(r"peak resident memory in training: ([\d.]+) MiB on the largest of 2 trainer", r.stdout)
    assert peak and 100 < float(peak.group(1)) < 4096, r.stdout[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(dp2 / "tensorboard"))
    events.Reload()   # the records as TensorBoard scalars (rank 0 only: one writer)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert {"grad_norm", "mfu", "peak_rss_mib", "val_loss"} <= set(events.Tags()["scalars"])
    assert (dp2 / "checkpoints" / "step_00000006" / "manifest.json").exists()
    if backend == "torch":
        r, dp4 = train(tmp_path, "np4", 4, [b, "train.batch_size=2", NO_CLIP])
        assert r.returncode == 0, r.stdout[-4000:]
        same_run(dp4, reference(b, "train.batch_size=8", NO_CLIP), rtol=1e-5, what="np4 without clipping")
    # a crash after the step-3 checkpoint, then a resume: the uninterrupted run's numbers
    t0 = time.monotonic()
    r, part = train(tmp_path, "part", 2, sets + ["train.fail_at_step=4", "train.fail_rank=1"], timeout=180)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and "injected failure" in r.stdout, r.stdout[-4000:]
    assert "[hvdllm] rank 1 failed" in r.stdout and "train.fail_at_step" in r.stdout, r.stdout[-3000:]
    assert elapsed < 150, f"took {elapsed:.0f}s to end the job"
    # (rank 0 may be ended before it logs step 4)
    assert [x["step"] for x in records(part) if "loss" in x] in ([1, 2, 3], [1, 2, 3, 4])
    r, part = train(tmp_path, "part", 2, sets + ["train.resume=true"])
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resumed from" in r.stdout
    same_run(part, dp2, rtol=1e-5, what="resumed")


@pytest.mark.integration
def test_dp_under_horovodrun_gloo(tmp_path, reference):
    r, gloo = train(tmp_path, "gloo", 2, ["backend=torch", "train.batch_size=4"], launcher="horovodrun")
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(gloo, reference("backend=torch", "train.batch_size=8"), rtol=2e-4, what="gloo")


@pytest.mark.integration
def test_one_failing_rank_ends_every_rank_under_horovodrun(tmp_path):
    """(Under mpirun: the crash in test_dp_equals_single_process_and_resumes_after_a_crash.)"""
    t0 = time.monotonic()
    r, _ = train(tmp_path, "fail", 2, ["train.fail_at_step=2", "train.fail_rank=1", "train.batch_size=4"],
                 launcher="horovodrun", timeout=180)
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
