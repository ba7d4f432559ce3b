"""mpi/: tag and header encodings, deadlines and imports in one process (MPI never initialised
here). The point-to-point check file under mpirun: tests/test_mpi_p2p.py."""
import subprocess
import sys
import time

import numpy as np
import pytest
from launch_util import ROOT

import mpi
from hvdllm.errors import PeerTimeout
from mpi import p2p


# -- tags ----------------------------------------------------------------------------------------
def test_tags_unique_and_in_range():
    tags = {(k, mb, c): mpi.tag(k, mb, c) for k in mpi.KINDS for mb in range(p2p.MB_WINDOW)
            for c in range(p2p.N_CHUNKS)}
    assert len(set(tags.values())) == len(tags)
    assert min(tags.values()) >= 0 and max(tags.values()) <= mpi.MAX_TAG == 32767
    assert len(mpi.KINDS) <= 1 << p2p.KIND_BITS


def test_tag_wraps_micro_batch_and_describes_itself():
    assert mpi.tag("act", 3) == mpi.tag("act", 3 + p2p.MB_WINDOW)
    assert mpi.tag("act", 3) != mpi.tag("grad", 3) != mpi.tag("act", 3, chunk=1)
    assert mpi.describe_tag(mpi.tag("grad", 300, chunk=5)) == "grad mb%256=44 chunk=5"
    assert "raw" in mpi.describe_tag(10 ** 6)


@pytest.mark.parametrize("args", [("nope", 0, 0), ("act", -1, 0), ("act", 0, 8), ("act", 0, -1)])
def test_tag_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        mpi.tag(*args)


# -- headers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", mpi.DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (1, 2, 3, 4, 5, 6, 7, 8)])
def test_header_round_trip(dtype, shape):
    h = mpi.encode_header(np.zeros(shape, dtype))
    assert h.shape == (mpi.HEADER_LEN,) and h.dtype == np.int64
    assert mpi.decode_header(h) == (shape, np.dtype(dtype))


def test_header_rejects_what_it_cannot_carry():
    with pytest.raises(TypeError, match="float32"):
        mpi.encode_header(np.zeros(2, np.complex64))
    with pytest.raises(TypeError):
        mpi.encode_header(np.zeros(2, ">f4"))
    with pytest.raises(ValueError, match="at most 8"):
        mpi.encode_header(np.zeros((1,) * 9))
    with pytest.raises(ValueError, match="out of step"):
        mpi.decode_header(np.arange(mpi.HEADER_LEN, dtype=np.int64))


# -- deadlines, with a stand-in request (no MPI needed) -------------------------------------------
class FakeReq:
    def __init__(self, done_after=None):
        self.calls, self.done_after = 0, done_after

    def Test(self, status=None):
        self.calls += 1
        return self.done_after is not None and self.calls >= self.done_after


def test_wait_times_out_naming_peer_without_spinning():
    fake = FakeReq()
    r = p2p.Request(fake, peer=3, tag=mpi.tag("act", 2), op="send", status=object())
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout) as e:
        mpi.wait(r, 0.3, "stage 1 forward")
    assert 0.3 <= time.monotonic() - t0 < 0.6
    assert fake.calls < 200          # backs off to 5 ms sleeps; a spin would poll ~10^5 times
    for part in ("stage 1 forward", "[3]", "act mb%256=2", "train.step_timeout"):
        assert part in str(e.value)


def test_waitall_completes_and_reports_only_pending():
    done = p2p.Request(FakeReq(done_after=3), peer=1, tag=5, op="send", status="s1")
    assert mpi.waitall([done], 1.0, "x") == ["s1"]
    stuck = p2p.Request(FakeReq(), peer=2, tag=6, op="send", status=object())
    late = p2p.Request(FakeReq(done_after=2), peer=7, tag=7, op="send", status=object())
    with pytest.raises(PeerTimeout, match=r"rank\(s\) \[2\]"):
        mpi.waitall([stuck, late], 0.1, "y")
    raw = p2p.Request(FakeReq(), peer=-1, tag=-1, op="request", status=object())
    with pytest.raises(PeerTimeout, match=r"from the other ranks \[request\]"):
        mpi.wait(raw, 0.05, "barrier")


# -- imports ---------------------------------------------------------------------------------------
def test_import_needs_no_mpi4py():
    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('mpi4py', 'torch', 'tensorflow', 'horovod'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, B())\n"
            "import mpi, mpi.p2p, mpi.groups\n"
            "assert mpi.tag('act', 1) == mpi.p2p.tag('act', 1)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
