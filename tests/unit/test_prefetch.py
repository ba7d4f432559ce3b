"""hvdllm/prefetch.py: the batches of a real data.Sampler, the same and in the same order with
and without the background thread; a producer's error raised in the trainer naming the step; a
stuck producer a deadline, not a hang; close() stops the thread early and on an error."""
import threading
import time

import numpy as np
import pytest

from hvdllm import data
from hvdllm.errors import HvdllmError
from hvdllm.prefetch import Prefetcher


def sampler():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    return data.Sampler(tokens, 16, 4, 2, 1, seed=3)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_order(depth):
    s = sampler()
    prepared = []
    with Prefetcher(s.batch, range(2, 40), depth, 5.0, prepare=lambda x, y: prepared.append(1) or (x, y)) as p:
        for step in range(2, 40):
            x, y = p.get(step)
            rx, ry = s.batch(step)
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)
    assert len(prepared) == 38


@pytest.mark.parametrize("depth", [0, 2])
def test_out_of_order_get_is_named(depth):
    with Prefetcher(lambda s: (s, s), range(5), depth, 5.0) as p, pytest.raises(HvdllmError, match="step 1 asked"):
        p.get(1)


@pytest.mark.parametrize("depth", [0, 2])
def test_producer_error_reaches_the_trainer(depth):
    def make(step):
        if step == 3:
            raise ValueError("bad window")
        return step, step
    with Prefetcher(make, range(10), depth, 5.0) as p:
        for step in range(3):
            assert p.get(step) == (step, step)
        with pytest.raises(HvdllmError, match="step 3 failed: ValueError: bad window") as e:
            p.get(3)
        assert isinstance(e.value.__cause__, ValueError)


def test_stuck_producer_is_a_deadline():
    release = threading.Event()

    def make(step):
        release.wait(10)
        return step, step
    p = Prefetcher(make, range(3), 2, 0.3)
    t0 = time.monotonic()
    with pytest.raises(HvdllmError, match="no batch for step 0 within 0.3 s"):
        p.get(0)
    assert time.monotonic() - t0 < 3
    release.set()
    p.close()
    assert not p._thread.is_alive()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    made = []
    p = Prefetcher(lambda s: made.append(s) or (s, s), range(10 ** 6), 2, 5.0)
    assert p.get(0) == (0, 0)
    time.sleep(0.2)   # the queue fills; the producer waits, at most depth + 1 batches ahead
    assert len(made) <= 4
    p.close()
    assert not p._thread.is_alive()


def test_error_in_the_loop_closes_the_thread():
    with pytest.raises(RuntimeError, match="engine failed"):
        with Prefetcher(lambda s: (s, s), range(10 ** 6), 2, 5.0) as p:
            p.get(0)
            raise RuntimeError("engine failed")
    assert not p._thread.is_alive()
