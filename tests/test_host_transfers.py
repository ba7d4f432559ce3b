"""The device seam: host transfers per step for dp, ZeRO-1, pp=2 and tp=2, both backends
(tests/parallel/check_transfers.py under mpirun -np 2 says what is counted and the bound)."""
import sys

import pytest

from launch_util import mpirun_argv, run


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_host_transfers_per_step(backend):
    argv = mpirun_argv(2) + ["-x", "HVDLLM_BACKEND", sys.executable, "-m", "pytest", "-q", "-p",
                             "no:cacheprovider", "tests/parallel/check_transfers.py"]
    r = run(argv, timeout=300, HVDLLM_BACKEND=backend)
    assert r.returncode == 0, r.stdout[-5000:]
