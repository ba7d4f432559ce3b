"""The parallel tier: the check files under mpirun -np 1, 2 and 4 and horovodrun --gloo. The
collective and aggregation check files share one launch (one pytest session per rank: Horovod is
started once), since each launch pays the imports of torch or TensorFlow and Horovod's start."""
import sys
import time

import pytest
from launch_util import horovodrun_argv, mpirun_argv, run

LAUNCHES = [("mpirun", 1), ("mpirun", 2), ("mpirun", 4), ("horovodrun", 2)]
# The stall check must fire fast in the op-order test, and stay above any honest wait.
STALL = {"HOROVOD_STALL_CHECK_TIME_SECONDS": 2, "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": 6}


def launch(launcher, np_, check_files, backend):
    fwd = ["-x", "HVDLLM_BACKEND", "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS",
           "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]
    pre = mpirun_argv(np_) + fwd if launcher == "mpirun" else horovodrun_argv(np_)
    argv = pre + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *check_files]
    return run(argv, timeout=300, HVDLLM_BACKEND=backend, **STALL)


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("launcher,np_", LAUNCHES, ids=[f"{launcher}-np{n}" for launcher, n in LAUNCHES])
def test_collectives_and_aggregation_conformance(backend, launcher, np_):
    """tests/parallel/check_collectives.py, then check_aggregation.py (whose disagreement tests
    come last: they leave Horovod with an error), on every rank."""
    r = launch(launcher, np_, ["tests/parallel/check_collectives.py", "tests/parallel/check_aggregation.py"], backend)
    assert r.returncode == 0, r.stdout[-6000:]
    assert r.stdout.count(" passed") >= np_, r.stdout[-3000:]


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_disagreeing_op_order_ends_the_job(backend, launcher):
    t0 = time.monotonic()
    if launcher == "mpirun":
        pre = mpirun_argv(2) + ["-x", "HVDLLM_BACKEND", "-x", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                                "-x", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]
    else:
        pre = horovodrun_argv(2)
    r = run(pre + [sys.executable, "tests/parallel/check_stall.py"], timeout=120, HVDLLM_BACKEND=backend, **STALL)
    assert r.returncode != 0 and "no error" not in r.stdout, r.stdout[-3000:]
    # MPI: Horovod's stall inspector reports and shuts down; Gloo: hvdllm's own deadline fires
    assert "stalled" in r.stdout or "did not finish within its deadline" in r.stdout, r.stdout[-3000:]
    assert time.monotonic() - t0 < 90
