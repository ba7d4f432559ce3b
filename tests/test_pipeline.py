"""Issue 4 at the integration tier: pipeline stages over MPI point-to-point reproduce the
single-process run of the same model, data and seed, for every schedule and DP x PP."""
import time

import numpy as np
import pytest

from test_integration import losses, train

BACKENDS = ["torch", "tensorflow"]
DEEP = ["model.n_layer=4"]  # 6 layers (embeddings, 4 blocks, head): room for pp=4 and v=2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for backend in BACKENDS:
        r, d = train(tmp, backend, 1, DEEP + [f"backend={backend}", "train.batch_size=8"])
        assert r.returncode == 0, r.stdout[-4000:]
        out[backend] = d
    return out


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
    np_, sets = CASES[case]
    r, d = train(tmp_path, case, np_, DEEP + [f"backend={backend}", *sets])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=1e-5)
    np.testing.assert_allclose(losses(d, "val_loss"), losses(reference[backend], "val_loss"), rtol=1e-5)
    # the checkpoint is the whole model: it resumes without a pipeline
    r, _ = train(tmp_path, case, 1, DEEP + [f"backend={backend}", "train.batch_size=8", "train.resume=true",
                                            "train.steps=7"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-4000:]


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
