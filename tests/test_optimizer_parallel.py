"""Issue 3 at the integration tier: ZeRO-1 and accumulation equal single-process training;
local SGD converges; fp16 wire compression stays close. Real runs under mpirun."""
import json
import shutil

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


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero1_checkpoint_is_sharded_and_resumes_at_other_dp_sizes(tmp_path, reference, backend):
    """Each dp rank writes the optimizer range it holds (nothing gathered to save); a run that
    dies after the step-3 checkpoint at ZeRO dp=2 resumes at dp=1 without ZeRO and at ZeRO dp=2
    and dp=4 with the uninterrupted losses."""
    sets = [f"backend={backend}", "parallel.zero=1"]
    r, d = train(tmp_path, "zero", 2, sets + ["train.batch_size=4", "train.fail_at_step=4", "train.fail_rank=1"])
    assert r.returncode != 0 and "injected failure" in r.stdout, r.stdout[-4000:]
    folder = d / "checkpoints" / "step_00000003"
    files = {p.name: np.load(p) for p in folder.glob("*.npz")}
    assert sorted(files) == ["pp0-tp0-dp1.npz", "pp0-tp0.npz"]
    moments = {n: sum(z[k].size for k in z.files if k.startswith("optim.m.")) for n, z in files.items()}
    n_params = sum(files["pp0-tp0.npz"][k].size for k in files["pp0-tp0.npz"].files
                   if not k.startswith(("optim.", "__")))
    assert sum(moments.values()) == n_params and max(moments.values()) <= n_params // 2 + 1, moments
    assert not [k for k in files["pp0-tp0-dp1.npz"].files if not k.startswith(("optim.m.", "optim.v.", "__"))]
    ref = losses(reference[backend])
    for name, np_, more in (("dp1", 1, ["train.batch_size=8", "parallel.zero=0"]),
                            ("dp2", 2, ["train.batch_size=4"]),    # each range read from its own file
                            ("dp4", 4, ["train.batch_size=2"])):
        shutil.copytree(d, tmp_path / name)
        r, out = train(tmp_path, name, np_, sets + more + ["train.resume=true"])
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-4000:]
        np.testing.assert_allclose(losses(out), ref, rtol=2e-4, err_msg=name)


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
    # summed gradients: the logged loss is still the mean (it rides in the same fused message)
    r, d = train(tmp_path, "sum", 2, [f"backend={backend}", "train.batch_size=4", "aggregation.op=sum"])
    assert r.returncode == 0, r.stdout[-4000:]
    np.testing.assert_allclose(losses(d)[0], losses(reference[backend])[0], rtol=2e-4)
    assert np.all(np.abs(losses(d) / losses(reference[backend]) - 1) < 0.1), losses(d)


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
