"""Adasum and the bf16 wire against their definitions at np=2 and np=4, both backends
(tests/parallel/check_modes.py)."""
import sys

import pytest
from launch_util import mpirun_argv, run


@pytest.mark.parallel
@pytest.mark.parametrize("np_", [2, 4])
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_aggregation_modes(backend, np_):
    argv = mpirun_argv(np_) + ["-x", "HVDLLM_BACKEND", sys.executable, "-m", "pytest", "-q", "-p",
                               "no:cacheprovider", "tests/parallel/check_modes.py"]
    r = run(argv, timeout=300, HVDLLM_BACKEND=backend)
    assert r.returncode == 0, r.stdout[-5000:]
