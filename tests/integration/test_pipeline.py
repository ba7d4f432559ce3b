"""Issue 4 at the integration tier: pipeline stages over MPI point-to-point reproduce the
single-process run of the same model, data and seed (losses, gradient norms, validation losses),
for every schedule and DP x PP; their checkpoints (the whole model) resume without a pipeline and
continue the same trajectory."""
import shutil
import time

import pytest
from launch_util import same_checkpoint, same_run, train

BACKENDS = ["torch", "tensorflow"]
DEEP = ["model.n_layer=4"]  # 6 layers (embeddings, 4 blocks, head): room for pp=4 and v=2


CASES = {
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=gpipe", "train.batch_size=8"]),
    "pp2-interleaved": (2, ["parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=interleaved",
                            "parallel.virtual_stages=2", "train.batch_size=8"]),
    "pp4-1f1b": (4, ["parallel.pp=4", "parallel.microbatches=4", "train.batch_size=8"]),
    "pp4-fewer-microbatches": (4, ["parallel.pp=4", "parallel.microbatches=2", "train.batch_size=8",
                                   "parallel.partition=uniform"]),
    "dp2xpp2": (4, ["parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_single_process(tmp_path, reference, backend, case):
    """...and its checkpoints are the whole model: the np=1 run's checkpoints (every parameter
    and moment, whole shapes), so they resume without a pipeline; pp2-interleaved (two chunks
    per stage) resumes at np=1 for real and continues the same trajectory."""
    np_, sets = CASES[case]
    ref = reference(*DEEP, f"backend={backend}", "train.batch_size=8")
    r, d = train(tmp_path, case, np_, DEEP + [f"backend={backend}", *sets])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=1e-5, what=case)
    for step in (3, 6):
        same_checkpoint(d, ref, step, what=f"{case} step {step}")
    if case != "pp2-interleaved":
        return
    shutil.copytree(d, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    r, res = train(tmp_path, "resumed", 1, DEEP + [f"backend={backend}", "train.batch_size=8", "train.resume=true"])
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 3" in r.stdout, r.stdout[-4000:]
    same_run(res, ref, rtol=1e-5, what=f"{case} resumed at np=1")


@pytest.mark.integration
def test_dead_stage_ends_every_rank(tmp_path):
    t0 = time.monotonic()
    r, _ = train(tmp_path, "dead", 2, DEEP + ["parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4",
                                              "train.fail_at_step=2", "train.fail_rank=1"], timeout=180)
    assert r.returncode != 0 and "[hvdllm] rank 1 failed" in r.stdout
    assert time.monotonic() - t0 < 150


@pytest.mark.integration
def test_pipeline_under_gloo_says_it_needs_mpi(tmp_path):
    r, _ = train(tmp_path, "gloo", 2, DEEP + ["parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4"],
                 launcher="horovodrun", timeout=180)
    assert r.returncode != 0
    assert "needs MPI" in r.stdout and "mpirun" in r.stdout
