"""The simulator itself (tests/unit/simcoll.py) against Horovod's semantics, the same values
tests/parallel/check_collectives.py and check_aggregation.py assert under mpirun: if the
simulator were wrong, the unit tests built on it would prove nothing."""
import threading
import time

import numpy as np
import pytest
from simcoll import FAULTS, CollectiveMismatch, World, run_group

KS = [1, 2, 3, 4, 7]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_sum_average_min_max(k, dtype):
    def body(c):
        x = (np.arange(12).reshape(3, 4) * (c.rank + 1)).astype(dtype)
        return {op: c.allreduce(x, op=op, name=op) for op in ("sum", "average", "min", "max")}
    base = np.arange(12).reshape(3, 4)
    for got in run_group(k, body):
        np.testing.assert_array_equal(got["sum"], (base * k * (k + 1) // 2).astype(dtype))
        if dtype != np.int64:
            np.testing.assert_allclose(got["average"], base * (k + 1) / 2, rtol=1e-6)
        np.testing.assert_array_equal(got["min"], base.astype(dtype))
        np.testing.assert_array_equal(got["max"], (base * k).astype(dtype))
        assert all(v.dtype == dtype and v.shape == (3, 4) for v in got.values())


@pytest.mark.parametrize("k", KS)
def test_reducescatter_shards_and_allgather_joins(k):
    def body(c):
        x = np.arange(4 * k + 3, dtype=np.float32) * (c.rank + 1)   # uneven: lower ranks get more
        shard = c.reducescatter(x, op="sum", name="rs")
        return shard, c.allgather(shard, name="ag"), c.allgather(np.full((c.rank + 1, 2), c.rank), name="uneven")
    full = np.arange(4 * k + 3, dtype=np.float32) * k * (k + 1) / 2
    pieces = np.array_split(full, k)
    for r, (shard, joined, uneven) in enumerate(run_group(k, body)):
        np.testing.assert_array_equal(shard, pieces[r])
        np.testing.assert_array_equal(joined, full)
        np.testing.assert_array_equal(uneven, np.concatenate([np.full((i + 1, 2), i) for i in range(k)]))
    assert [len(p) for p in pieces] == sorted((len(p) for p in pieces), reverse=True)


@pytest.mark.parametrize("k", KS)
def test_broadcast_from_each_root_and_results_bit_identical(k):
    def body(c):
        got = [c.broadcast(np.full(3, 10.0 * c.rank), root=root, name=f"bc{root}") for root in range(k)]
        rng = np.random.default_rng(c.rank)
        return got, c.allreduce(rng.normal(size=50).astype(np.float32), name="avg")
    res = run_group(k, body)
    for got, _ in res:
        for root in range(k):
            np.testing.assert_array_equal(got[root], np.full(3, 10.0 * root))
    assert all(np.array_equal(res[0][1], avg) for _, avg in res)


def test_compression_round_trip():
    def body(c):
        x = np.linspace(-2, 2, 101).astype(np.float32) * (c.rank + 1)
        return {w: c.allreduce(x, op="average", compression=w, name=w) for w in ("fp16", "bf16")}
    want = np.linspace(-2, 2, 101) * 1.5
    for got in run_group(2, body):
        np.testing.assert_allclose(got["fp16"], want, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got["bf16"], want, rtol=1e-2, atol=1e-2)
        assert got["fp16"].dtype == got["bf16"].dtype == np.float32
        assert not np.array_equal(got["bf16"], want.astype(np.float32))   # the wire did round


def test_ranks_that_disagree_all_get_an_error():
    def name(c):
        return c.allreduce(np.zeros(3, np.float32), name=f"x{c.rank}")

    def shape(c):
        return c.allreduce(np.zeros(3 + c.rank, np.float32), name="x")

    def kind(c):
        return c.allreduce(np.zeros(3), name="x") if c.rank else c.allgather(np.zeros(3), name="x")
    for body in (name, shape, kind):
        with pytest.raises(CollectiveMismatch):
            run_group(3, body)


def test_a_missing_rank_fails_fast_instead_of_hanging():
    def body(c):
        if c.rank == 1:
            return None          # never joins the collective
        return c.allreduce(np.zeros(2), name="x")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="timed out"):
        run_group(3, body, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_an_exception_on_one_rank_ends_the_others_at_once():
    def body(c):
        if c.rank == 2:
            raise ValueError("boom on rank 2")
        return c.allreduce(np.zeros(2), name="x")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom on rank 2"):
        run_group(3, body, timeout=30)
    assert time.monotonic() - t0 < 5
    assert threading.active_count() < 10


def test_process_sets_are_independent():
    """A 2x2 grid: row groups and column groups, as dp and tp groups are."""
    w = World(4)
    rows = {**w.group([0, 1]), **w.group([2, 3])}
    cols = {**w.group([0, 2]), **w.group([1, 3])}

    def body(r):
        x = np.array([float(r)])
        return rows[r].allreduce(x, op="sum", name="row")[0], cols[r].allreduce(x, op="sum", name="col")[0], \
            (rows[r].rank, rows[r].size)
    assert w.run(body) == [(1.0, 2.0, (0, 2)), (1.0, 4.0, (1, 2)), (5.0, 2.0, (0, 2)), (5.0, 4.0, (1, 2))]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_fault_changes_a_result(fault):
    def body(c):
        x = np.arange(6, dtype=np.float64) * (c.rank + 1)
        return np.concatenate([c.allreduce(x, op="average", name="a"), c.allreduce(x, op="sum", name="s"),
                               c.reducescatter(x, op="sum", name="rs"), c.allgather(x[:2] + c.rank, name="ag")])
    assert not np.array_equal(run_group(3, body), run_group(3, body, fault=fault))
