"""hvdllm/stop.py's Agreement on k simulated ranks: a signal seen by one rank only stops every
rank at the same step, within one check interval; the interval is fixed once, alike everywhere,
from the mean step time; without a signal nobody stops and the checks are 1 per interval."""
import math
import threading

import numpy as np
import pytest
from simcoll import World

from hvdllm import stop


def run_agreement(k, signal_rank, signal_after, step_s, check_s=0.05, first=0, last=60):
    """Each rank calls due(done, its step time) after every step; `signal_rank` sees the signal
    from step `signal_after` on (None: never). Returns ([stop step per rank], collectives)."""
    w = World(k)
    comms = w.group()
    seen = {}   # thread name -> this rank's last finished step

    def received():
        me = threading.current_thread().name
        return signal_rank is not None and me == f"simrank{signal_rank}" and seen.get(me, -1) >= signal_after

    def body(r):
        a = stop.Agreement(comms[r], check_s, first)
        for done in range(first + 1, last + 1):
            seen[threading.current_thread().name] = done
            if a.due(done, step_s[r]):
                return done, a.every
        return None, a.every
    orig = stop.received
    stop.received = received
    try:
        res = w.run(body)
    finally:
        stop.received = orig
    return res, w.groups[0].log


@pytest.mark.parametrize("k,signal_rank", [(2, 1), (3, 0), (4, 3)])
@pytest.mark.parametrize("signal_after", [1, 7, 20])
def test_one_rank_signalled_stops_all_at_one_step(k, signal_rank, signal_after):
    step_s = [0.01 * (r + 1) for r in range(k)]
    res, log = run_agreement(k, signal_rank, signal_after, step_s)
    every = math.ceil(0.05 / (sum(step_s) / k))
    assert {e for _, e in res} == {every}                      # fixed alike on every rank
    stops = {s for s, _ in res}
    assert len(stops) == 1, res                               # the same step everywhere
    (s,) = stops
    assert s >= max(signal_after, 2) and s <= max(signal_after, 2) + every, (s, every)
    assert log[0][1] == "stop.init" and all(n == "stop.check" for _, n in log[1:])


def test_no_signal_no_stop_and_one_check_per_interval():
    res, log = run_agreement(3, None, 0, [0.01, 0.02, 0.03], last=62, first=2)
    assert all(s is None for s, _ in res)
    every = res[0][1]
    assert every == math.ceil(0.05 / 0.02)
    # the first check after 2 steps past the start, then every `every` steps
    assert len(log) == 1 + sum(1 for done in range(5, 63) if (done - 2) % every == 0)
    assert np.all([n in ("stop.init", "stop.check") for _, n in log])
