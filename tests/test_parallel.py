"""The parallel tier: the same check files under mpirun -np 1, mpirun -np 2 and horovodrun --gloo."""
import sys

import pytest

from launch_util import horovodrun_argv, mpirun_argv, run

LAUNCHES = [("mpirun", 1), ("mpirun", 2), ("horovodrun", 2)]


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("launcher,np_", LAUNCHES, ids=[f"{l}-np{n}" for l, n in LAUNCHES])
def test_collectives(backend, launcher, np_):
    pre = mpirun_argv(np_) + ["-x", "HVDLLM_BACKEND"] if launcher == "mpirun" else horovodrun_argv(np_)
    argv = pre + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/parallel/check_collectives.py"]
    r = run(argv, timeout=240, HVDLLM_BACKEND=backend)
    assert r.returncode == 0, r.stdout[-6000:]
    assert r.stdout.count(" passed") >= np_, r.stdout[-3000:]
