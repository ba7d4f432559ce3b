"""Issue 5 at the integration tier: tensor parallelism and 3-D layouts reproduce the single-process
run (losses, gradient norms, validation losses), and a checkpoint saved under one layout resumes
under another with the same numbers. np=8 only for the one 3-D (dp, pp, tp) = (2, 2, 2) run."""
import shutil
import sys

import numpy as np
import pytest
from launch_util import mpirun_argv, run, same_checkpoint, same_run, train

from hvdllm import checkpoint

BACKENDS = ["torch", "tensorflow"]


@pytest.mark.parallel
@pytest.mark.parametrize("backend", BACKENDS)
def test_tp_layers_and_collective_count(backend):
    argv = mpirun_argv(2) + ["-x", "HVDLLM_BACKEND", sys.executable, "-m", "pytest", "-q", "-p",
                             "no:cacheprovider", "tests/parallel/check_tp.py"]
    r = run(argv, timeout=180, HVDLLM_BACKEND=backend)
    assert r.returncode == 0, r.stdout[-5000:]


LAYOUTS = {  # name: (np, settings); per-rank batch keeps the global batch at 8
    "tp2": (2, ["parallel.tp=2", "train.batch_size=8"]),
    "dp2xtp2": (4, ["parallel.tp=2", "train.batch_size=4"]),
    "dp2xpp2xtp2": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_layouts_equal_single_process_and_reshard(tmp_path, reference, backend):
    b = [f"backend={backend}"]
    ref = reference(*b, "train.batch_size=8")
    for name, (np_, sets) in LAYOUTS.items():
        r, d = train(tmp_path, name, np_, b + sets, timeout=400)
        assert r.returncode == 0, f"{name}\n{r.stdout[-4000:]}"
        same_run(d, ref, rtol=1e-5, what=name)
        for step in (3, 6):   # the slices and stages, joined, are the np=1 run's checkpoint
            same_checkpoint(d, ref, step, what=f"{name} step {step}")
    # Saved at (dp,pp,tp) = (2,2,2) after step 3 (the step-3 checkpoint), resumed elsewhere:
    # each resumed trajectory equals the uninterrupted one. The checkpoint is 4 shard files
    # (pp x tp), written by the dp-rank-0 process of each position; nothing was gathered.
    saved = tmp_path / "dp2xpp2xtp2" / "checkpoints"
    state, meta = checkpoint.load(saved / "step_00000003")
    assert sorted(p.name for p in (saved / "step_00000003").glob("*.npz")) == \
        ["pp0-tp0.npz", "pp0-tp1.npz", "pp1-tp0.npz", "pp1-tp1.npz"]
    assert "dp=2 pp=2 tp=2" in meta["layout"] and state.shapes["h.0.attn.c_attn.weight"] == (32, 96)
    assert state.arrays["h.0.attn.c_attn.weight"]["shards"][0][1]["groups"] == 3
    # Assembled, it is the np=1 checkpoint (above): it loads at (1, 1, 1) as any whole checkpoint
    # does. to112: the tp slices straight from their files, the stages joined; to121: whole
    # arrays cut into other stages. (The dp size does not enter a checkpoint without ZeRO:
    # (4, 1, 2) at np=8 loads exactly as (1, 1, 2) does.)
    for name, np_, sets in [("to112", 2, ["parallel.tp=2", "train.batch_size=8"]),
                            ("to121", 2, ["parallel.pp=2", "parallel.microbatches=2", "train.batch_size=8"])]:
        out = tmp_path / name
        shutil.copytree(saved / "step_00000003", out / "checkpoints" / "step_00000003")
        r, d = train(tmp_path, name, np_, b + sets + ["train.resume=true"], timeout=400)
        assert r.returncode == 0 and "resumed from" in r.stdout, f"{name}\n{r.stdout[-4000:]}"
        same_run(d, ref, rtol=1e-5, steps=[4, 5, 6], what=name)


@pytest.mark.integration
def test_convert_writes_one_unsharded_file(tmp_path):
    r, d = train(tmp_path, "tp", 2, ["parallel.tp=2", "train.batch_size=8", "train.steps=2"])
    assert r.returncode == 0, r.stdout[-4000:]
    out = tmp_path / "model.npz"
    r = run([sys.executable, "-m", "hvdllm", "convert", str(d), str(out), "--hf"], timeout=120)
    assert r.returncode == 0, r.stdout
    z = np.load(out)
    ck, _ = checkpoint.load(d / "checkpoints" / "step_00000002")
    np.testing.assert_array_equal(z["transformer.h.1.mlp.c_fc.weight"], ck["h.1.mlp.c_fc.weight"])
    assert z["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # whole, not a tp slice
    assert not [k for k in z.files if k.startswith("optim")]
    # --optimizer keeps the moments: one unsharded file with everything the shards hold
    r = run([sys.executable, "-m", "hvdllm", "convert", str(d), str(out), "--optimizer"], timeout=120)
    assert r.returncode == 0, r.stdout
    one, meta = checkpoint.load(out)
    assert sorted(one) == sorted(ck) and meta["step"] == 2
    for k in ck:
        np.testing.assert_array_equal(one[k], ck[k], err_msg=k)


PP2 = ["parallel.pp=2", "parallel.microbatches=2"]
ZERO_GRIDS = {  # name: (np, settings, shard files at step 3, resumed layouts (name, np, settings))
    "dp2xtp2": (4, ["parallel.tp=2", "train.batch_size=4"],
                ["pp0-tp0-dp1.npz", "pp0-tp0.npz", "pp0-tp1-dp1.npz", "pp0-tp1.npz"],
                [("to_dp1xtp2", 2, ["parallel.tp=2", "train.batch_size=8"])]),
    "dp2xpp2": (4, PP2 + ["train.batch_size=4"],
                ["pp0-tp0-dp1.npz", "pp0-tp0.npz", "pp1-tp0-dp1.npz", "pp1-tp0.npz"],
                [("to_dp1xpp2", 2, PP2 + ["train.batch_size=8"])]),
}


@pytest.mark.integration
@pytest.mark.parametrize("grid", list(ZERO_GRIDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero1_beside_tensor_and_pipeline_parallelism(tmp_path, reference, backend, grid):
    """ZeRO-1 over dp beside tp (Megatron's distributed optimizer) and beside pipeline stages:
    equals np=1; every rank writes its own range of its slice's or stage's moments (the tied
    wte's come from two stages, cut at different places), which joined are the np=1 run's
    checkpoint (so it loads at (1,1,1) without ZeRO, as any whole checkpoint does); resumed at
    dp=1 with ZeRO, the numbers are the uninterrupted ones."""
    np_, sets, files, resumes = ZERO_GRIDS[grid]
    b = [f"backend={backend}", "parallel.zero=1"]
    ref = reference(f"backend={backend}", "train.batch_size=8")
    r, d = train(tmp_path, "zero", np_, b + sets, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=2e-4, what=grid)
    saved = d / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in saved.glob("*.npz")) == files
    state, _ = checkpoint.load(saved)
    assert state.shapes["optim.m.h.0.attn.c_attn.weight"] == (32, 96)
    same_checkpoint(d, ref, 3, what=f"{grid} step 3")
    for name, n, more in resumes:
        out = tmp_path / name
        shutil.copytree(saved, out / "checkpoints" / "step_00000003")
        r, dd = train(tmp_path, name, n, b + more + ["train.resume=true"], timeout=400)
        assert r.returncode == 0 and "resumed from" in r.stdout, f"{name}\n{r.stdout[-4000:]}"
        same_run(dd, ref, rtol=2e-4, steps=[4, 5, 6], what=name)
