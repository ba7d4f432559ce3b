"""mpi/ point-to-point under a launcher (not collected by plain pytest):

    mpirun -np 2 python -m pytest tests/parallel/check_p2p.py      (also -np 4)

Every rank runs every test in the same order. Ranks pair up (0-1, 2-3); values depend on the
sender so a crossed message shows. Every wait has a deadline, so a failing rank makes its
partner fail too instead of hanging the job.
"""
import time

import numpy as np
import pytest
from mpi4py import MPI

import mpi
from hvdllm.errors import PeerTimeout
from hvdllm.layout import Layout

W = MPI.COMM_WORLD
R, S = W.Get_rank(), W.Get_size()
PEER = R ^ 1
T = 10.0                                      # generous deadline for things that should succeed
assert S % 2 == 0, "check_p2p.py pairs ranks up: run it under an even number of ranks"


def barrier(what="barrier"):
    mpi.wait(W.Ibarrier(), T, what)


def test_tag_ub_fits():
    assert mpi.tag_ub(W) >= mpi.MAX_TAG == 32767


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint16])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 40000)])  # last one is past the eager limit
def test_ping_pong(dtype, shape):
    x = np.asarray((np.arange(int(np.prod(shape))).reshape(shape) % 1000 + R), dtype)
    back = np.empty_like(x)
    t = mpi.tag("act", 1)
    if R % 2 == 0:
        mpi.send(W, x, PEER, t, T)
        mpi.recv_into(W, back, PEER, mpi.tag("grad", 1), T)
        np.testing.assert_array_equal(back, (x + 1).astype(dtype))   # the partner's reply
    else:
        mpi.recv_into(W, back, PEER, t, T)
        np.testing.assert_array_equal(back, (x - 1).astype(dtype))   # sender's rank is R - 1
        mpi.send(W, np.asarray(back + 1, dtype), PEER, mpi.tag("grad", 1), T)


def test_recv_into_rejects_wrong_size():
    if R % 2 == 0:
        mpi.send(W, np.zeros(3, np.float32), PEER, mpi.tag("ctl", 5), T)
    else:
        with pytest.raises(ValueError, match="sent 12 bytes, expected 16"):
            mpi.recv_into(W, np.zeros(4, np.float32), PEER, mpi.tag("ctl", 5), T)


def _mb_array(mb, sender):
    """A different shape, rank and dtype per micro-batch."""
    dtype = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint16][mb % 6]
    shape = [(mb + 1,), (2, mb + 1), (mb % 3 + 1, 4, 3), (), (0, 5), (1, 2, 1, 2)][mb % 6]
    return (np.arange(int(np.prod(shape))).reshape(shape) + 10 * sender + mb).astype(dtype)


def test_shape_exchange_varies_per_micro_batch():
    """Forward activations one way, gradients of other shapes the other way, 12 micro-batches."""
    for mb in range(12):
        if R % 2 == 0:
            mpi.send_array(W, _mb_array(mb, R), PEER, "act", mb, T)
            got = mpi.recv_array(W, PEER, "grad", mb, T)
            want = _mb_array(mb + 1, PEER)
        else:
            got = mpi.recv_array(W, PEER, "act", mb, T)
            want = _mb_array(mb, PEER)
            mpi.send_array(W, _mb_array(mb + 1, R), PEER, "grad", mb, T)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_many_in_flight_complete_out_of_order():
    """Both directions at once; sends posted in reverse order and mixed sizes; receives
    waited on in a shuffled order, then the rest together."""
    n, rng = 24, np.random.default_rng(R)
    sizes = [(3 if mb % 3 else 70000) for mb in range(n)]                 # some rendezvous
    outs = [np.empty(k, np.float64) for k in sizes]
    recvs = [mpi.irecv(W, outs[mb], PEER, mpi.tag("act", mb, chunk=mb % 2)) for mb in range(n)]
    srcs = [np.full(k, 1000.0 * R + mb) for mb, k in enumerate(sizes)]
    sends = [mpi.isend(W, srcs[mb], PEER, mpi.tag("act", mb, chunk=mb % 2)) for mb in reversed(range(n))]
    for i in rng.permutation(n)[: n // 2]:
        mpi.wait(recvs[i], T, f"recv mb {i}")
    statuses = mpi.waitall(recvs + sends, T, "many in flight")
    assert len(statuses) == 2 * n
    for mb in range(n):
        np.testing.assert_array_equal(outs[mb], np.full(sizes[mb], 1000.0 * PEER + mb))
        assert statuses[mb].Get_source() == PEER and statuses[mb].Get_tag() == mpi.tag("act", mb, mb % 2)


def test_recv_from_silent_peer_times_out_then_recovers():
    """Nobody sends on this tag: PeerTimeout within ~1-2 s of a 1 s deadline, naming the peer,
    the tag and the setting to raise; the cancelled receive must not eat a later message."""
    t = mpi.tag("ctl", 99, chunk=7)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout) as e:
        mpi.recv_into(W, np.empty(4, np.int64), PEER, t, timeout_s=1.0, what="silent check")
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert 1.0 <= elapsed < 2.0, elapsed
    assert f"[{PEER}]" in msg and "silent check" in msg and "train.step_timeout" in msg
    assert f"tag {t}" in msg and "ctl mb%256=99 chunk=7" in msg
    barrier("after timeout")
    # now the message does come, on the same tag: a fresh receive gets it
    out = np.empty(4, np.int64)
    reqs = [mpi.isend(W, np.full(4, R, np.int64), PEER, t), mpi.irecv(W, out, PEER, t)]
    mpi.waitall(reqs, T, "after cancel")
    np.testing.assert_array_equal(out, np.full(4, PEER))


def test_waitall_timeout_names_only_pending_peers():
    t = mpi.tag("ctl", 3)
    got = np.empty(1, np.int64)
    sent = mpi.isend(W, np.array([R], np.int64), PEER, mpi.tag("ctl", 4))
    reqs = [mpi.irecv(W, np.empty(1, np.int64), PEER, t), mpi.irecv(W, got, PEER, mpi.tag("ctl", 4)), sent]
    with pytest.raises(PeerTimeout, match=rf"rank\(s\) \[{PEER}\] \[recv tag {t} "):
        mpi.waitall(reqs, 1.0, "partial")
    assert got[0] == PEER
    barrier("after partial")


def test_objects_with_deadline():
    t, obj = mpi.tag("ctl", 7), {"from": R, "big": list(range(20000))}   # past the eager limit
    if R % 2 == 0:                        # a large send completes only once it is received
        mpi.send_obj(W, obj, PEER, t, T)
    got = mpi.recv_obj(W, PEER, t, T)
    if R % 2 == 1:
        mpi.send_obj(W, obj, PEER, t, T)
    assert got["from"] == PEER and got["big"][-1] == 19999
    with pytest.raises(PeerTimeout, match="train.step_timeout"):
        mpi.recv_obj(W, PEER, mpi.tag("ctl", 8), 0.3, what="no object")
    barrier("after objects")


def test_poll_any_serves_whoever_sends_first():
    """Rank 0 is a server; the last rank pushes first, the others only after the server says go."""
    push, last = mpi.tag("push", 0), S - 1
    if R == 0:
        workers = list(range(1, S))
        with pytest.raises(PeerTimeout, match="poll_any"):
            mpi.poll_any(W, workers, mpi.tag("pull", 0), 0.2)
        first = mpi.poll_any(W, workers, push, T)
        assert first == last
        assert mpi.recv_array(W, first, "push", 0, T)[0] == first
        for w in workers[:-1]:
            mpi.send_obj(W, "go", w, mpi.tag("ctl", 0), T)
        box, served = mpi.Mailbox(W, workers[:-1], push), []
        for _ in workers[:-1]:
            src = box.next(T)
            assert mpi.recv_array(W, src, "push", 0, T)[0] == src
            served.append(src)
        assert sorted(served) == workers[:-1]
    else:
        if R != last:
            assert mpi.recv_obj(W, 0, mpi.tag("ctl", 0), T) == "go"
        mpi.send_array(W, np.array([R], np.int32), 0, "push", 0, T)
    barrier("after poll_any")


def test_subcomms_from_layout():
    """dp x pp grid (pp=2): sizes, group-rank order, and a dp allreduce sums only the dp group."""
    lay = Layout(world_size=S, rank=R, dp=S // 2, pp=2)
    comms = {k: mpi.subcomms(W, lay, k) for k in ("dp", "pp", "tp")}
    try:
        for kind, c in comms.items():
            group = lay.group(kind)
            assert c.Get_size() == len(group) and group[c.Get_rank()] == R
        x, out = np.array([R + 1.0]), np.empty(1)
        mpi.wait(comms["dp"].Iallreduce(x, out, op=MPI.SUM), T, "dp allreduce")
        assert out[0] == sum(r + 1 for r in lay.group("dp"))
        assert comms["tp"].Get_size() == 1
    finally:
        for c in comms.values():
            c.Free()


def test_split_roles():
    roles = ["server"] + ["trainer"] * (S - 1)
    roles[-1] = "trainer+evaluator"
    comms = mpi.split_roles(W, roles)
    try:
        mine = {"server"} if R == 0 else ({"trainer", "evaluator"} if R == S - 1 else {"trainer"})
        assert set(comms) == mine
        if "trainer" in comms:
            assert comms["trainer"].Get_size() == S - 1 and comms["trainer"].Get_rank() == R - 1
        if "evaluator" in comms:
            assert comms["evaluator"].Get_size() == 1
    finally:
        for c in comms.values():
            c.Free()
