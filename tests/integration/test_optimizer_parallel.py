"""Issue 3 at the integration tier: ZeRO-1 and accumulation equal single-process training (losses,
gradient norms, validation losses), with and without clipping; predivide and fp16 on the wire keep
the average's scale and op=sum gives exactly size x the norm; local SGD and DiLoCo converge. Real
runs under mpirun. The strategies' arithmetic on k simulated ranks in one process (sharded step =
unsharded step, the norm, checkpoint pieces, loading at any dp size; averaging, the outer step):
tests/unit/test_zero1_sim.py and tests/unit/test_local_sgd_sim.py."""
import shutil

import numpy as np
import pytest
from launch_util import losses, same_checkpoint, same_run, train

BACKENDS = ["torch", "tensorflow"]
NO_CLIP = "optim.grad_clip=0"   # TINY's gradient norm is ~2: the default optim.grad_clip=1 clips every step


@pytest.mark.integration
@pytest.mark.parametrize("backend,clip", [("torch", []), ("tensorflow", [NO_CLIP])],
                         ids=["torch-clip1", "tensorflow-noclip"])
def test_zero1_equals_single_process_is_sharded_and_resumes_at_other_dp_sizes(tmp_path, reference, backend,
                                                                               clip):
    """ZeRO-1 at dp=2 equals np=1 until it dies after the step-3 checkpoint. Each dp rank wrote
    the optimizer range it holds (nothing gathered to save); joined, the ranges are the np=1
    run's checkpoint (so it loads without ZeRO, as any whole checkpoint does), and the run
    resumes at ZeRO dp=2 (each range read from its own file) with the uninterrupted numbers.
    Loading at dp sizes whose ranges cut across the files: tests/unit/test_zero1_sim.py."""
    ref = reference(f"backend={backend}", "train.batch_size=8", *clip)
    sets = [f"backend={backend}", "parallel.zero=1", *clip]
    r, d = train(tmp_path, "zero", 2, sets + ["train.batch_size=4", "train.fail_at_step=4", "train.fail_rank=1"])
    assert r.returncode != 0 and "injected failure" in r.stdout, r.stdout[-4000:]
    # 2e-4, not DP's 1e-5: the norm is summed from float32 dots over each shard (TF measured 2.3e-5)
    same_run(d, ref, rtol=2e-4, steps=[1, 2, 3], what="ZeRO dp=2 before the failure")
    folder = d / "checkpoints" / "step_00000003"
    files = {p.name: np.load(p) for p in folder.glob("*.npz")}
    assert sorted(files) == ["pp0-tp0-dp1.npz", "pp0-tp0.npz"]
    moments = {n: sum(z[k].size for k in z.files if k.startswith("optim.m.")) for n, z in files.items()}
    n_params = sum(files["pp0-tp0.npz"][k].size for k in files["pp0-tp0.npz"].files
                   if not k.startswith(("optim.", "__")))
    assert sum(moments.values()) == n_params and max(moments.values()) <= n_params // 2 + 1, moments
    assert not [k for k in files["pp0-tp0-dp1.npz"].files if not k.startswith(("optim.m.", "optim.v.", "__"))]
    same_checkpoint(d, ref, 3, what="ZeRO dp=2 step 3")
    shutil.copytree(d, tmp_path / "dp2")
    r, out = train(tmp_path, "dp2", 2, sets + ["train.batch_size=4", "train.resume=true"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-4000:]
    same_run(out, ref, rtol=2e-4, what="resumed at ZeRO dp=2")


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_equals_single_process_without_clipping(tmp_path, reference, backend):
    """2 ranks x 2 micro-batches of 2 = np=1's batch of 8. Evaluation runs in batches of
    train.batch_size per rank: 4 of them cover the 16 sequences np=1's 2 batches of 8 do (with 2,
    the validation loss came from half the sequences and agreed only to 1.5e-4)."""
    r, d = train(tmp_path, "acc", 2, [f"backend={backend}", "train.batch_size=2", "aggregation.accumulation=2",
                                      NO_CLIP, "train.eval_batches=4"])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, reference(f"backend={backend}", "train.batch_size=8", NO_CLIP), rtol=1e-5, what="accumulation")


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_predivide_fp16_wire_and_the_scale_of_a_sum(tmp_path, reference, backend):
    ref = reference(f"backend={backend}", "train.batch_size=8")
    b = [f"backend={backend}", "train.batch_size=4"]
    r, d = train(tmp_path, "pre", 2, b + ["aggregation.predivide=2.0"])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=2e-4, what="predivide")
    r, d = train(tmp_path, "fp16", 2, b + ["aggregation.compression=fp16"])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=5e-3, what="fp16 on the wire")
    # Summed gradients over 2 ranks: the norm is exactly twice the average's at every step. The
    # loss is the same: the logged loss is still the mean (it rides in the same fused message),
    # and the clipped gradient is the same one (every step clips: both norms are above 1).
    r, d = train(tmp_path, "sum", 2, b + ["aggregation.op=sum"])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=2e-4, scale={"grad_norm": 2.0}, what="op=sum")


# torch's run is also fp16, with rank 1's gradients overflowing at step 2 (the testing aid)
FP16_RANK1 = ['train.precision="fp16"', "train.fail_at_step=1", "train.fail_rank=1", 'train.fail_mode="overflow"']


@pytest.mark.integration
@pytest.mark.parametrize("backend,outer", [("torch", FP16_RANK1),
                                           ("tensorflow", ["localsgd.outer_lr=0.7", "localsgd.outer_momentum=0.9"])],
                         ids=["torch-averaging-fp16", "tensorflow-diloco"])
def test_local_sgd_and_diloco_converge(tmp_path, reference, backend, outer):
    """H=3: parameters averaged every 3 steps (and at the end); torch takes the average as it is,
    TensorFlow DiLoCo's outer step. Step 1 runs on the same weights everywhere: its loss is the
    np=1 run's (fp16: to 2e-2, the precision table's tolerance). Then the loss falls as DP's does.
    fp16: rank 1's overflow is skipped on rank 1 alone, so rank 0 (whose records these are) skips
    nothing and keeps its scale. (Replicas equal after each average and only then, the outer
    step's formula: tests/unit/test_local_sgd_sim.py; fp16's skip on one rank only, the average
    then the mean of two single-process runs: tests/unit/test_precision.py.)"""
    sets = [f"backend={backend}", "train.batch_size=4", "localsgd.every=3", "train.steps=12",
            "train.eval_every=12", *outer]
    r, d = train(tmp_path, "local", 2, sets)
    assert r.returncode == 0, r.stdout[-4000:]
    got = losses(d)
    assert len(got) == 12 and got[-1] < got[0] - 0.5, got
    fp16 = outer is FP16_RANK1
    np.testing.assert_allclose(got[0], losses(reference(f"backend={backend}", "train.batch_size=8"))[0],
                               rtol=2e-2 if fp16 else 2e-4)
    if fp16:
        assert not any(losses(d, "skipped")) and set(losses(d, "loss_scale")) == {2.0 ** 16}
