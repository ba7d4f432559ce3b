"""ZeRO-2 and ZeRO-3 (hvdllm/strategies/zero_sharded.py) in both frameworks, one mpirun -np 4
launch and one -np 8 (tests/parallel/check_zero_sharded.py says what it checks): zero=2 / zero=3
at dp=4, zero=3 at dp=2 x tp=2, zero=2 / zero=3 inside pp=2 x dp=2 pipeline stages and in the 3-D
grid dp=2 x pp=2 x tp=2 equal np=1 (losses, gradient norms, validation loss, weights; clipping
binding and not, accumulation, optimizer offload, 1F1B and interleaved), fp16 with loss scaling
at zero=3 dp=4, beside tp=2 and zero=2 / zero=3 in pp=2 x dp=2 stages (one rank's overflow skipped
on every rank, np=1's final scale), zero=3's peak parameter bytes per rank within its shards and
two units, resume across stages, dp sizes, tp slices and pipelines from a sharded checkpoint, and
a rank with another model refused with a message. The sharding arithmetic on simulated ranks:
tests/unit/test_zero_sharded_sim.py."""
import sys

import pytest
from launch_util import ROOT, mpirun_argv, run

LAYOUTS = ("zero2_dp4", "zero3_dp4", "zero2_dp4_noclip", "zero3_dp4_noclip", "zero3_dp4_accumulation",
           "zero3_dp4_offload", "zero3_dp2_tp2", "zero2_pp2_dp2", "zero3_pp2_dp2", "zero3_pp2_dp2_interleaved_noclip",
           "zero3_dp4_fp16", "zero3_dp2_tp2_fp16", "zero2_pp2_dp2_fp16", "zero3_pp2_dp2_fp16")
RESUMES = ("zero=3 dp=4 -> zero=0 np=1", "zero=3 dp=4 -> zero=3 dp=4", "zero=0 np=1 -> zero=3 dp=4",
           "pp=2 zero=3 dp=2 -> zero=0 np=1", "pp=2 zero=3 dp=2 -> pp=2 zero=3 dp=2", "zero=0 np=1 -> pp=2 zero=3 dp=2")
LAYOUTS_3D = ("zero3_dp2_pp2_tp2", "zero2_dp2_pp2_tp2")
GRID = "dp=2 pp=2 tp=2 zero=3"
RESUMES_3D = (f"{GRID} -> zero=0 np=1", f"{GRID} -> {GRID}", f"zero=0 np=1 -> {GRID}")


def check(np_, tmp_path, timeout, layouts, resumes, peak):
    """The check file under mpirun -np np_: every rank printed each layout's and each resume's
    line (zero=0 np=1 is one rank, in torch only), and `peak`'s parameter bytes."""
    script = ROOT / "tests" / "parallel" / "check_zero_sharded.py"
    r = run(mpirun_argv(np_) + ["-x", "ZERO_CHECK_DIR", sys.executable, str(script)], timeout=timeout,
            ZERO_CHECK_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in ("torch", "tensorflow"):
        for name in layouts:
            assert r.stdout.count(f"{backend} {name}: equals np=1") == np_, (name, r.stdout[-6000:])
        for what in resumes:
            n = np_ if not what.endswith("np=1") else 1 if backend == "torch" else 0
            assert r.stdout.count(f"{backend} resume {what}: step 3 equals") == n, (what, r.stdout[-6000:])
        assert f"{backend} {peak}: peak parameter bytes" in r.stdout, r.stdout[-6000:]
    return r.stdout


@pytest.mark.integration
def test_zero2_zero3_equal_single_process_resume_and_refuse_another_model(tmp_path):
    out = check(4, tmp_path, 500, LAYOUTS, RESUMES, "zero3_dp4")
    for backend in ("torch", "tensorflow"):
        assert out.count(f"{backend} mismatched model: refused") == 4, out[-6000:]


@pytest.mark.integration
def test_zero2_zero3_in_the_3d_grid_equal_single_process_and_resume(tmp_path):
    """np=8, (dp, pp, tp) = (2, 2, 2): each stage's tp slices sharded over its dp group."""
    check(8, tmp_path, 300, LAYOUTS_3D, RESUMES_3D, "zero3_dp2_pp2_tp2")
