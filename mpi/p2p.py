"""Point-to-point between two ranks: numpy buffers (or GPU arrays, through a CUDA-aware MPI:
cuda_aware), tags that say what a message is, deadlines.

Every wait here ends in completion or `PeerTimeout`, never a hang: a lost peer must become an
error the CLI can report (and end the job on), not a stuck job. `mpi4py.MPI` is imported only
inside functions (and callers pass a `comm`), so importing this module never initialises MPI.

Tag encoding (15 bits, so it fits under the smallest MPI_TAG_UB the standard allows, 32767):

    tag = kind << 11 | chunk << 8 | (mb % 256)
          bits 14-11: kind code (KINDS, 16 slots)   bits 10-8: chunk 0-7   bits 7-0: micro-batch

`chunk` is a small enumerated extra (model chunk of an interleaved pipeline, shard, direction).
The micro-batch wraps modulo 256. That is safe because MPI never lets two messages with the same
(source, tag, comm) overtake each other: only more than 256 same-kind messages matched *out of*
order would collide, and no schedule keeps that many in flight between one pair of ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import PeerTimeout

KINDS = ("ctl", "act", "grad", "shape", "params", "push", "pull", "eval", "gen", "ckpt", "user")
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
KIND_BITS, CHUNK_BITS, MB_BITS = 4, 3, 8
MB_WINDOW, N_CHUNKS = 1 << MB_BITS, 1 << CHUNK_BITS
MAX_TAG = (1 << (KIND_BITS + CHUNK_BITS + MB_BITS)) - 1   # 32767 = guaranteed MPI_TAG_UB
TIMEOUT_SETTING = "train.step_timeout"
_SLEEP_START, _SLEEP_CAP = 50e-6, 5e-3


def _MPI():
    from mpi4py import MPI  # lazy: initialises MPI on first use, never at import
    return MPI


# -- tags --------------------------------------------------------------------------------------
def tag(kind: str, mb: int, chunk: int = 0) -> int:
    """The tag of message `kind` for micro-batch `mb` (wrapped mod 256) and `chunk` (0-7)."""
    if kind not in _KIND_CODE:
        raise ValueError(f"unknown message kind {kind!r}; known: {', '.join(KINDS)}")
    if mb < 0 or not 0 <= chunk < N_CHUNKS:
        raise ValueError(f"tag({kind!r}): need mb >= 0 and 0 <= chunk < {N_CHUNKS}, got {mb}, {chunk}")
    return (_KIND_CODE[kind] << (CHUNK_BITS + MB_BITS)) | (chunk << MB_BITS) | (mb % MB_WINDOW)


def describe_tag(t: int) -> str:
    """Human form of a tag for error messages: 'act mb%256=3 chunk=0'."""
    if not 0 <= t <= MAX_TAG:
        return f"raw tag {t}"
    code, chunk, mb = t >> (CHUNK_BITS + MB_BITS), (t >> MB_BITS) & (N_CHUNKS - 1), t & (MB_WINDOW - 1)
    kind = KINDS[code] if code < len(KINDS) else f"kind#{code}"
    return f"{kind} mb%{MB_WINDOW}={mb} chunk={chunk}"


def tag_ub(comm) -> int:
    """This MPI's largest tag; raise if the encoding above would not fit (never on a conforming MPI)."""
    ub = comm.Get_attr(_MPI().TAG_UB)
    if ub < MAX_TAG:
        raise RuntimeError(f"MPI_TAG_UB is {ub}, below the {MAX_TAG} the tag encoding needs")
    return ub


# -- device buffers: does this MPI read GPU memory itself? ---------------------------------------
def parse_ompi_info(text: str) -> bool | None:
    """Open MPI's answer in `ompi_info --parsable --all` output (None: the line is not there)."""
    for line in text.splitlines():
        if line.startswith("mca:mpi:base:param:mpi_built_with_cuda_support:value:"):
            return line.rsplit(":", 1)[1].strip() == "true"
    return None


_CUDA_AWARE = None


def cuda_aware() -> bool:
    """Whether this MPI takes GPU buffers (CUDA-aware): mpi4py's MPIX_Query_cuda_support where it
    has one, else Open MPI's build setting from ompi_info; anything else is taken as not. Asked
    once per process: an MPI that says yes at build time may still say no at run time, which is
    why mpi4py's run-time query wins when present."""
    global _CUDA_AWARE
    if _CUDA_AWARE is None:
        query = getattr(_MPI(), "Query_cuda_support", None)
        if query is not None:
            _CUDA_AWARE = bool(query())
        else:
            import shutil
            import subprocess
            exe = shutil.which("ompi_info")
            out = subprocess.run([exe, "--parsable", "--all"], capture_output=True, text=True,
                                 timeout=60).stdout if exe else ""
            _CUDA_AWARE = bool(parse_ompi_info(out))
    return _CUDA_AWARE


# -- requests and deadlines --------------------------------------------------------------------
@dataclass
class Request:
    """An in-flight operation plus what a timeout message needs: peer, tag, direction.
    Holds the buffer so it stays alive (and unmoved) until MPI is done with it."""
    req: Any
    peer: int
    tag: int
    op: str = "recv"               # "send" | "recv" | "probe" | "request" (a raw mpi4py one)
    buf: Any = field(default=None, repr=False)
    status: Any = field(default=None, repr=False)
    done: bool = False

    def test(self) -> bool:
        """Non-blocking check that also drives MPI progress; idempotent once complete."""
        if not self.done:
            if self.status is None:
                self.status = _MPI().Status()
            self.done = bool(self.req.Test(self.status))
        return self.done


def _as_request(r) -> Request:
    return r if isinstance(r, Request) else Request(r, peer=-1, tag=-1, op="request")


def _device_meta(array) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a GPU array (one with __cuda_array_interface__: a torch CUDA tensor,
    detached), which mpi4py hands a CUDA-aware MPI as a device pointer; None for anything else."""
    cai = getattr(array, "__cuda_array_interface__", None)
    if cai is None:
        return None
    if cai.get("strides") is not None:   # None is how the interface says C-contiguous
        raise ValueError("MPI device buffers must be C-contiguous (use .contiguous())")
    return tuple(int(d) for d in cai["shape"]), np.dtype(cai["typestr"])


def _buffer(array: np.ndarray):
    if _device_meta(array) is None and (not isinstance(array, np.ndarray) or not array.flags.c_contiguous):
        raise ValueError("MPI buffers must be C-contiguous numpy arrays (use np.ascontiguousarray)")
    return [array, _MPI().BYTE]  # bytes on the wire: any dtype, no MPI type mapping needed


def isend(comm, array: np.ndarray, dest: int, tag: int) -> Request:
    """Start sending `array`'s bytes to `dest`. Do not modify `array` until the request completes."""
    return Request(comm.Isend(_buffer(array), dest=dest, tag=tag), dest, tag, "send", array)


def irecv(comm, array_out: np.ndarray, source: int, tag: int) -> Request:
    """Start receiving into `array_out` (preallocated, exact size) from `source`."""
    return Request(comm.Irecv(_buffer(array_out), source=source, tag=tag), source, tag, "recv", array_out)


def _timeout(pending: Sequence[Request], timeout_s: float, what: str) -> PeerTimeout:
    """Cancel what MPI can cancel (receives; Open MPI cannot cancel sends) and build the error."""
    for r in pending:
        if r.op == "recv":
            r.req.Cancel()
            r.req.Wait()   # completes at once: cancelled, or it matched after all
    peers = sorted({r.peer for r in pending if r.peer >= 0})
    who = f"rank(s) {peers}" if peers else "the other ranks"   # raw requests (collectives)
    tags = ", ".join(sorted({f"{r.op} tag {r.tag} ({describe_tag(r.tag)})" if r.tag >= 0 else r.op
                             for r in pending}))
    return PeerTimeout(f"{what}: no progress within {timeout_s:g}s from {who} [{tags}]; "
                       f"that rank is lost or stuck. If the step is just slow, raise {TIMEOUT_SETTING}.")


def _poll(done, timeout_s: float) -> bool:
    """Call done() until it is true or the deadline passes, sleeping 50 us doubling to 5 ms
    in between: ranks share cores with their peers, so a spinning wait would starve them."""
    deadline, nap = time.monotonic() + timeout_s, _SLEEP_START
    while not done():
        if time.monotonic() >= deadline:
            return done()   # one last look, so a late completion is not reported as a timeout
        time.sleep(nap)
        nap = min(nap * 2, _SLEEP_CAP)
    return True


def wait(req, timeout_s: float, what: str):
    """Wait for one request; return its MPI Status, or raise PeerTimeout naming peer and tag."""
    r = _as_request(req)
    if not _poll(r.test, timeout_s):
        raise _timeout([r], timeout_s, what)
    return r.status


def waitall(reqs, timeout_s: float, what: str) -> list:
    """Wait for every request, in whatever order they finish; return their Statuses in order.
    On timeout the error lists only the peers still pending."""
    rs = [_as_request(r) for r in reqs]
    left = list(rs)

    def done():
        left[:] = [r for r in left if not r.test()]
        return not left
    if not _poll(done, timeout_s):
        raise _timeout(left, timeout_s, what)
    return [r.status for r in rs]


def send(comm, array: np.ndarray, dest: int, tag: int, timeout_s: float, what: str = "send") -> None:
    """Blocking send with a deadline (a large message completes only once `dest` receives it)."""
    wait(isend(comm, array, dest, tag), timeout_s, f"{what} to rank {dest}")


def recv_into(comm, array_out: np.ndarray, source: int, tag: int, timeout_s: float,
              what: str = "recv") -> np.ndarray:
    """Blocking receive into `array_out`; a message of another size is an error, not a partial fill."""
    st = wait(irecv(comm, array_out, source, tag), timeout_s, f"{what} from rank {source}")
    got = st.Get_count(_MPI().BYTE)
    shape, dtype = _device_meta(array_out) or (array_out.shape, array_out.dtype)
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if got != want:
        raise ValueError(f"{what}: rank {source} sent {got} bytes, expected {want} "
                         f"({dtype}{list(shape)}) on {describe_tag(tag)}")
    return array_out


# -- arrays whose shape varies: header then payload --------------------------------------------
DTYPES = (np.float32, np.float64, np.float16, np.int32, np.int64, np.uint16, np.uint8)
_DTYPE_CODE = {np.dtype(d): i + 1 for i, d in enumerate(DTYPES)}
MAX_NDIM, _MAGIC = 8, 0x68766431          # 'hvd1': a desynchronised stream fails loudly
HEADER_LEN = 3 + MAX_NDIM                  # magic, dtype code, ndim, dims (zero padded)


def encode_header(array: np.ndarray) -> np.ndarray:
    """Fixed-size int64 header (so the receiver can preallocate it) describing `array` (a numpy
    array, or a GPU array: _device_meta)."""
    shape, dtype = _device_meta(array) or (array.shape, array.dtype)
    code = _DTYPE_CODE.get(dtype)
    if code is None or dtype.byteorder == ">":
        raise TypeError(f"cannot send dtype {dtype}; supported: {[np.dtype(d).name for d in DTYPES]}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"cannot send a {len(shape)}-d array (at most {MAX_NDIM} dims)")
    h = np.zeros(HEADER_LEN, np.int64)
    h[:3] = _MAGIC, code, len(shape)
    h[3:3 + len(shape)] = shape
    return h


def _contiguous(array):
    """A numpy view of `array` in C order (0-d stays 0-d, as ascontiguousarray would not keep
    it); a GPU array as it is (_device_meta checks its layout)."""
    return array if _device_meta(array) is not None else np.asarray(array, order="C")


def decode_header(h: np.ndarray) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a header made by encode_header."""
    if h.shape != (HEADER_LEN,) or h[0] != _MAGIC or not 1 <= h[1] <= len(DTYPES) \
            or not 0 <= h[2] <= MAX_NDIM:
        raise ValueError(f"not an array header (sender and receiver out of step?): {h.tolist()}")
    return tuple(int(d) for d in h[3:3 + int(h[2])]), np.dtype(DTYPES[int(h[1]) - 1])


def send_array(comm, array: np.ndarray, dest: int, tag_kind: str, mb: int, timeout_s: float,
               chunk: int = 0) -> None:
    """Send header then payload on the same tag: MPI's non-overtaking rule keeps them in order,
    and sharing the tag means headers of different kinds can never be confused."""
    array = _contiguous(array)
    t = tag(tag_kind, mb, chunk)
    reqs = [isend(comm, encode_header(array), dest, t), isend(comm, array, dest, t)]
    waitall(reqs, timeout_s, f"send_array {tag_kind} mb={mb} to rank {dest}")


def isend_array(comm, array: np.ndarray, dest: int, tag_kind: str, mb: int, chunk: int = 0) -> list:
    """Non-blocking send_array: returns the two requests (header, payload); the caller waits
    for them later with a deadline. Pipeline schedules post these and keep computing."""
    array = _contiguous(array)
    t = tag(tag_kind, mb, chunk)
    return [isend(comm, encode_header(array), dest, t), isend(comm, array, dest, t)]


def recv_array(comm, source: int, tag_kind: str, mb: int, timeout_s: float, chunk: int = 0,
               alloc=np.empty) -> np.ndarray:
    """Receive what send_array sent: header, allocate, payload. The deadline covers both.
    `alloc(shape, dtype)` makes the payload's array (e.g. in pinned memory, for a GPU's copy)."""
    t, what = tag(tag_kind, mb, chunk), f"recv_array {tag_kind} mb={mb}"
    deadline = time.monotonic() + timeout_s
    shape, dtype = decode_header(recv_into(comm, np.empty(HEADER_LEN, np.int64), source, t,
                                           timeout_s, what))
    out = alloc(shape, dtype)
    return recv_into(comm, out, source, t, max(deadline - time.monotonic(), 0.0), what)


# -- small pickled objects (control messages; rare, never the hot path) -------------------------
def send_obj(comm, obj: Any, dest: int, tag: int, timeout_s: float, what: str = "send_obj") -> None:
    wait(Request(comm.isend(obj, dest=dest, tag=tag), dest, tag, "send"), timeout_s, what)


def recv_obj(comm, source: int, tag: int, timeout_s: float, what: str = "recv_obj") -> Any:
    """Matched probe (Improbe) then receive: any size works, and a timeout leaves no posted
    receive behind that could later swallow the message."""
    found = []

    def probe():
        m = comm.improbe(source=source, tag=tag)
        if m is not None:
            found.append(m)
        return bool(found)
    if not _poll(probe, timeout_s):
        raise _timeout([Request(None, source, tag, "probe")], timeout_s, what)
    return found[0].recv()


# -- whichever peer is ready first (parameter servers) ------------------------------------------
def poll_any(comm, sources: Sequence[int], tag: int, timeout_s: float) -> int:
    """The first rank of `sources` (checked in the given order) with a message on `tag` ready.
    Nothing is received: the caller then receives from that rank."""
    hit = []

    def probe():
        src = next((s for s in sources if comm.Iprobe(source=s, tag=tag)), None)
        if src is not None:
            hit.append(src)
        return bool(hit)
    if not _poll(probe, timeout_s):
        raise _timeout([Request(None, s, tag, "probe") for s in sources], timeout_s, "poll_any")
    return hit[0]


class Mailbox:
    """poll_any with round-robin fairness: after serving a rank, it is checked last next time,
    so one fast worker cannot starve the others."""

    def __init__(self, comm, sources: Sequence[int], tag: int):
        self.comm, self.sources, self.tag = comm, list(sources), tag

    def next(self, timeout_s: float) -> int:
        src = poll_any(self.comm, self.sources, self.tag, timeout_s)
        i = self.sources.index(src)
        self.sources = self.sources[i + 1:] + self.sources[:i + 1]
        return src
