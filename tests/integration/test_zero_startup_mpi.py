"""ZeRO-3 starts without the whole model, on the real engines of both frameworks: one mpirun -np 2
launch of tests/parallel/check_zero_startup.py (it says what it measures and checks). The same
on numpy, measured with tracemalloc: tests/unit/test_zero_startup.py."""
import sys

import pytest
from launch_util import ROOT, mpirun_argv, run


@pytest.mark.integration
def test_zero3_startup_peak_within_shards_and_units_both_backends():
    script = ROOT / "tests" / "parallel" / "check_zero_startup.py"
    # every allocation of 64 KiB or more its own mapping, unmapped when freed: glibc then keeps no
    # freed memory in its heap, so the resident figures are what is alive
    r = run(mpirun_argv(2) + ["-x", "MALLOC_MMAP_THRESHOLD_", sys.executable, str(script)], timeout=300,
            MALLOC_MMAP_THRESHOLD_="65536")
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in ("torch", "tensorflow"):
        assert r.stdout.count(f"{backend} zero3 start-up: within shards and units") == 2, r.stdout[-6000:]
