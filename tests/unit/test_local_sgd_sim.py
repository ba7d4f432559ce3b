"""Local SGD and DiLoCo (hvdllm/strategies/local_sgd.py) on k simulated ranks: replicas are
equal right after every averaging and only then; the average is the plain mean of the replicas;
the outer (DiLoCo) step follows its formula, Nesterov or not; the state round-trips. On numpy
and on both backends' tensors (simcoll.backend): what trains is the torch / tf path."""
import numpy as np
import pytest
from simcoll import BACKENDS, World, backend, run_group_on

from hvdllm.config import LocalSGDConfig
from hvdllm.strategies.local_sgd import LocalSGD

N, LR = 37, 0.1


def grad(rank, step):
    return np.random.default_rng(1000 * step + rank).normal(size=N).astype(np.float32) * (1 + rank)


def p0():
    return np.random.default_rng(7).normal(size=N).astype(np.float32)


def train(k, cfg, steps, fault=None, world=None, be="numpy"):
    """Each rank: SGD on its own gradients; LocalSGD.sync when due. Returns per rank the
    list of (step, parameters before sync or None, parameters after the step), as numpy."""
    b = backend(be)
    w = world or World(k, fault=fault)
    comms = b.group(w)

    def body(r):
        ls, p, trace = LocalSGD(cfg, comms[r], b.tensor(p0())), b.tensor(p0()), []
        for s in range(1, steps + 1):
            p = p - float(np.float32(LR)) * b.tensor(grad(r, s))
            before = None
            if ls.due(s, steps):
                before = b.numpy(p)
                p = ls.sync(p)
                if be != "numpy":   # the vectors stayed the backend's own
                    assert not isinstance(p, np.ndarray) and not isinstance(ls.buf, np.ndarray)
            trace.append((s, before, b.numpy(p)))
        return trace, ls
    return w.run(body)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("every,steps", [(3, 8), (1, 3), (4, 4)])
def test_replicas_equal_after_each_average_and_differ_between(k, every, steps, be):
    w = World(k)
    res = train(k, LocalSGDConfig(every=every), steps, world=w, be=be)
    synced = {s for s in range(1, steps + 1) if s % every == 0 or s == steps}
    for i, s in enumerate(range(1, steps + 1)):
        after = [trace[i][2] for trace, _ in res]
        if s in synced:
            before = np.stack([trace[i][1] for trace, _ in res])
            want = before.astype(np.float64).mean(0)
            for a in after:
                np.testing.assert_array_equal(a, after[0])                  # bit-identical replicas
                np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-7)    # the plain mean
        else:
            assert all(trace[i][1] is None for trace, _ in res)
            for a in after[1:]:
                assert not np.allclose(a, after[0], rtol=1e-3), f"replicas equal at step {s} between averages"
    # one message per averaging and none between: communication is 1/H of DP's
    assert [n for _, n in w.groups[0].log] == ["localsgd.params"] * len(synced)
    assert {ls.syncs for _, ls in res} == {len(synced)}


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("outer_lr,mu", [(0.7, 0.9), (0.5, 0.0), (1.0, 0.9)])
def test_diloco_outer_step_follows_its_formula(nesterov, outer_lr, mu, be):
    """delta = anchor - mean_i theta_i; buf = mu*buf + delta; update = delta + mu*buf (Nesterov)
    or buf; theta = anchor - outer_lr*update = the new anchor, on every rank; computed here in
    float64 from the replicas' recorded parameters."""
    k, every, steps = 3, 2, 7
    res = train(k, LocalSGDConfig(every=every, outer_lr=outer_lr, outer_momentum=mu, nesterov=nesterov), steps,
                be=be)
    anchor, buf = p0().astype(np.float64), np.zeros(N)
    n_sync = 0
    for i, s in enumerate(range(1, steps + 1)):
        if res[0][0][i][1] is None:
            continue
        n_sync += 1
        avg = np.mean([trace[i][1].astype(np.float64) for trace, _ in res], axis=0)
        delta = anchor - avg
        buf = mu * buf + delta
        anchor = anchor - outer_lr * (delta + mu * buf if nesterov else buf)
        for trace, ls in res:
            np.testing.assert_allclose(trace[i][2], anchor, rtol=1e-5, atol=1e-6, err_msg=f"step {s}")
    assert n_sync == 4   # steps 2, 4, 6 and the last
    # the outer step really differs from plain averaging (else this test could not tell them apart)
    plain = train(k, LocalSGDConfig(every=every), steps, be=be)
    assert not np.allclose(plain[0][0][-1][2], res[0][0][-1][2], rtol=1e-3)


def check_mean(k, cfg, steps, fault=None):
    res = train(k, cfg, steps, fault=fault)
    for i in range(steps):
        if res[0][0][i][1] is not None:
            want = np.mean([trace[i][1].astype(np.float64) for trace, _ in res], axis=0)
            for trace, _ in res:
                np.testing.assert_allclose(trace[i][2], want, rtol=1e-6, atol=1e-7)


def test_the_mean_check_fails_when_the_average_is_a_sum():
    """The check can fail: a sum instead of an average is caught. A fault in a collective that
    local SGD does not use (allgather) changes nothing: the check tests what the strategy sends."""
    check_mean(3, LocalSGDConfig(every=2), 4)
    with pytest.raises(AssertionError):
        check_mean(3, LocalSGDConfig(every=2), 4, fault="average_is_sum")
    check_mean(3, LocalSGDConfig(every=2), 4, fault="allgather_reversed")


@pytest.mark.parametrize("be", BACKENDS)
def test_state_round_trip_continues_identically(be):
    """state() -> load() into a fresh LocalSGD (a resumed run): the next syncs are the same. The
    state is host numpy (a checkpoint's), whatever the vectors are."""
    cfg = LocalSGDConfig(every=2, outer_lr=0.7, outer_momentum=0.9)
    t = backend(be)

    def body(comm):
        a = LocalSGD(cfg, comm, t.tensor(p0()))
        p = t.tensor(p0())
        for s in range(1, 5):
            p = p - float(np.float32(LR)) * t.tensor(grad(comm.rank, s))
            if a.due(s, 8):
                p = a.sync(p)
        state = a.state()
        assert all(isinstance(v, np.ndarray) for v in state.values())
        b = LocalSGD(cfg, comm, t.tensor(np.zeros(N, np.float32)))
        b.load({k: v.copy() for k, v in state.items()})
        q = p - float(np.float32(LR)) * t.tensor(grad(comm.rank, 5))
        return t.numpy(a.sync(q)), t.numpy(b.sync(q))
    for x, y in run_group_on(t, 2, body):
        np.testing.assert_array_equal(x, y)


def test_due_on_every_hth_step_and_the_last():
    ls = LocalSGD(LocalSGDConfig(every=3), None, np.zeros(2, np.float32))
    assert [s for s in range(1, 11) if ls.due(s, 10)] == [3, 6, 9, 10]
