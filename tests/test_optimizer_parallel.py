"""Issue 3 at the integration tier: ZeRO-1 and accumulation equal single-process training;
local SGD converges; fp16 wire compression stays close. Real runs under mpirun."""
import json

import numpy as np
import pytest

from test_integration import losses, train

BACKENDS = ["torch", "tensorflow"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 8: the trajectory each strategy is compared with (per backend)."""
    out = {}
    tmp = tmp_path_factory.mktemp("ref")
    for backend in BACKENDS:
        r, d = train(tmp, backend, 1, [f"backend={backend}", "train.batch_size=8"])
        assert r.returncode == 0, r.stdout[-4000:]
        out[backend] = d
    return out


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero1_equals_single_process(tmp_path, reference, backend):
    r, d = train(tmp_path, "zero", 2, [f"backend={backend}", "train.batch_size=4", "parallel.zero=1"])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=2e-4)
    # the checkpoint holds the whole (gathered) optimizer state, loadable at any dp size
    r, d1 = train(tmp_path, "zero", 1, [f"backend={backend}", "train.batch_size=8", "parallel.zero=1",
                                         "train.resume=true", "train.steps=7"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-4000:]


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_equals_single_process(tmp_path, reference, backend):
    r, d = train(tmp_path, "acc", 2, [f"backend={backend}", "train.batch_size=2", "aggregation.accumulation=2"])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=2e-4)


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_predivide_and_fp16_wire(tmp_path, reference, backend):
    r, d = train(tmp_path, "pre", 2, [f"backend={backend}", "train.batch_size=4", "aggregation.predivide=2.0"])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=2e-4)
    r, d = train(tmp_path, "fp16", 2, [f"backend={backend}", "train.batch_size=4", "aggregation.compression=fp16"])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=5e-3)


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_local_sgd_converges(tmp_path, reference, backend):
    """H=3: parameters averaged every 3 steps (and at the end). Loss falls as DP's does."""
    sets = [f"backend={backend}", "train.batch_size=4", "localsgd.every=3", "train.steps=12",
            "train.eval_every=12"]
    r, d = train(tmp_path, "local", 2, sets)
    assert r.returncode == 0, r.stdout[-4000:]
    got = losses(d)
    assert got[-1] < got[0] - 0.5, got
    r, dd = train(tmp_path, "dilo", 2, sets + ["localsgd.outer_lr=0.7", "localsgd.outer_momentum=0.9"])
    assert r.returncode == 0, r.stdout[-4000:]
    assert losses(dd)[-1] < losses(dd)[0] - 0.5
