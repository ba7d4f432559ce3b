"""mpi/: the point-to-point check file under mpirun -np 2 and -np 4 (tag and header
encodings, deadlines and imports in one process: tests/unit/test_mpi_encoding.py)."""
import sys

import pytest
from launch_util import mpirun_argv, run


# -- under mpirun ----------------------------------------------------------------------------------
@pytest.mark.parallel
@pytest.mark.parametrize("np_", [2, 4])
def test_p2p_under_mpirun(np_):
    argv = mpirun_argv(np_) + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/parallel/check_p2p.py"]
    r = run(argv, timeout=180)
    assert r.returncode == 0, r.stdout[-6000:]
    assert r.stdout.count(" passed") >= np_, r.stdout[-3000:]
