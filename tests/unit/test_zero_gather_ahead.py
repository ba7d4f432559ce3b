"""ZeRO-3's gathers issued one unit ahead on a thread (zero_sharded.GatherAhead: TensorFlow's, whose
Horovod ops block in eager mode), on simulated ranks: on test_zero_sharded_sim's numpy model and
on the TensorFlow ShardedEngine itself (the built-in GPT, its own GatherAhead), the step equals
the unsharded one (np=1 at zero=0 for TF: losses, gradient norms with clipping binding, the
validation loss), every gather the schedule needs next is issued while the unit before it
computes and runs on the thread at the same time (Ahead below: a gather issued in its unit's own
turn, or run in the caller, fails the test), at most the shards plus two units' needs are ever
held, and a stalled or failing gather ends the step with an error naming the unit, within
train.step_timeout, never a hang; the thread is stopped by close() and by a failed step.

The simulator matches each member's collectives in the order they are called (one slot per
member), where Horovod matches them by name: the gathers therefore travel on a second group of
the same ranks, in the order the thread issues them (the same on every rank, as under Horovod)."""
import threading
import time

import numpy as np
import pytest
from simcoll import World, backend
from test_zero_sharded_sim import LRS as SIM_LRS
from test_zero_sharded_sim import OWNED, SHAPES, USES, L, NumpyRunner, batches, init, reference
from test_zero_sharded_sim import cfg as optim_cfg

from hvdllm.config import AggregationConfig
from hvdllm.errors import HvdllmError
from hvdllm.strategies.zero_sharded import GatherAhead, ZeroSharded

DEADLINE = 20.0   # s: how long a rendezvous below waits before it fails the test


def unit_of(name: str) -> int:
    return int(name.split(".")[2])   # zero.gather.<unit>.<phase>


class Ahead:
    """Proves that each gather runs ahead, on the thread, beside the unit before it. From the
    step's schedule (ZeroSharded.step's order: per micro-batch every unit's forward, then the
    backward down to the lowest unit), the gathers it must make, in order: the first position's
    units for themselves, then for each position j the units position j + 1 needs that j does
    not. Each gather (on the thread) waits until position j's compute has begun, then runs;
    position j's compute waits until its gathers are done. A gather issued only in its own
    unit's turn leaves position j waiting for it; one run in the caller's thread waits for a
    compute that cannot begin: both fail here, with the position named."""

    def __init__(self, z, mbs: int, steps: int):
        U = len(z.layouts)
        order = [(ph, u) for _ in range(mbs)
                 for ph, units in (("f", range(U)), ("b", range(U - 1, z.lowest - 1, -1))) for u in units]
        needs = [set(z.needs[u]) for _, u in order] + [set()]
        n = len(order)
        self.plan = []   # (unit, the position while whose compute it must run: None = before the step)
        for s in range(steps):
            self.plan += [(v, None) for v in sorted(needs[0])]
            self.plan += [(v, s * n + j) for j in range(n) for v in sorted(needs[j + 1] - needs[j])]
        self.order, self.n = order, n
        self.cond = threading.Condition()
        self.issued, self.done, self.entered = 0, set(), -1
        self.ahead_runs = 0   # gathers that ran while the unit before them computed

    def gather(self, inner):
        def g(t, name):
            with self.cond:
                i = self.issued
                self.issued += 1
                assert i < len(self.plan), f"gather {name} beyond the schedule's {len(self.plan)}"
                v, pos = self.plan[i]
                assert unit_of(name) == v, f"gather #{i} was {name}, the schedule's is unit {v} (position {pos})"
                if pos is not None and not self.cond.wait_for(lambda: self.entered >= pos, DEADLINE):
                    raise AssertionError(f"{name} ran before position {pos}'s compute began: not beside it")
            out = inner(t, name)
            with self.cond:
                self.done.add(i)
                self.ahead_runs += pos is not None
                self.cond.notify_all()
            return out
        return g

    def compute(self, inner):
        def c(u, *args):
            with self.cond:
                j = self.entered = self.entered + 1
                ph, want = self.order[j % self.n]
                assert want == u, f"position {j}: unit {u} computes, the schedule's is {want}"
                self.cond.notify_all()
                mine = [i for i, (_, pos) in enumerate(self.plan) if pos == j]
                if not self.cond.wait_for(lambda: all(i in self.done for i in mine), DEADLINE):
                    raise AssertionError(f"position {j} ({ph} of unit {u}): the gathers of units "
                                         f"{[self.plan[i][0] for i in mine]} for the next position are not done "
                                         f"while it computes: not issued ahead of it")
            return inner(u, *args)
        return c

    def check_complete(self):
        assert self.issued == len(self.plan) == len(self.done), (self.issued, len(self.plan), len(self.done))
        assert self.ahead_runs > 0


def watched(run, ahead: Ahead):
    run.unit_forward = ahead.compute(run.unit_forward)
    run.unit_backward = ahead.compute(run.unit_backward)
    return run


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mbs", [1, 2], ids=["one-micro-batch", "accumulation"])
def test_gathers_run_ahead_beside_the_unit_before_and_the_step_is_unchanged(k, mbs):
    clip, steps = 0.05, 3
    data = batches(k, steps, mbs)
    want, want_norms, _ = reference(data, clip, steps)
    assert min(want_norms) > clip   # clipping binds at every step
    world = World(k, timeout=DEADLINE)
    comms, wire = world.group(), world.group()

    def body(r):
        z = ZeroSharded(USES, OWNED, SHAPES, comms[r], optim_cfg(clip), AggregationConfig(), 3)
        watch = Ahead(z, mbs, steps)
        ahead = GatherAhead(watch.gather(lambda t, name: wire[r].allgather(t, name=name)), DEADLINE)
        z.gather_async = (ahead.start, ahead.finish)
        run = watched(NumpyRunner(init(), mbs), watch)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        run.w.clear()
        norms = []
        for t in range(steps):
            mine = data[t][r]
            norms.append(z.step(run, [m[0] for m in mine], [m[1] for m in mine], SIM_LRS[t % len(SIM_LRS)])[1])
            assert not run.w and not z.live and not z.pending, "whole units left after the step"
        watch.check_complete()
        thread = ahead._thread
        assert ahead.close() and not thread.is_alive()
        return z.host_params(), norms, z
    for rank, (got, norms, z) in enumerate(world.run(body)):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-5, err_msg=f"rank {rank}: norm")
        for n in SHAPES:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {n}")
        largest = sorted((4 * sum(z.layouts[v].total for v in z.needs[u]) for u in range(L + 2)), reverse=True)
        assert z.peak_param_bytes <= 4 * z.size + sum(largest[:2]), (z.peak_param_bytes, largest)


@pytest.mark.parametrize("how", ["stall", "error"])
def test_a_stalled_or_failing_gather_ahead_names_its_unit_and_never_hangs(how):
    """Unit 2's gather (issued while unit 1 computes) never returns, or raises: the step fails
    at unit 2's turn naming it, within the deadline (0.3 s): a stall as HvdllmError, a failed
    gather as its own exception (Horovod's elastic mode recovers from HorovodInternalError) with
    the unit in a note; once the stalled gather returns, close() ends the thread."""
    timeout, release = 0.3, threading.Event()
    data = batches(2, 1, 1)
    world = World(2, timeout=DEADLINE)
    comms, wire = world.group(), world.group()

    def body(r):
        def gather(t, name):
            if unit_of(name) == 2:
                if how == "error":
                    raise RuntimeError("the wire broke")
                release.wait(DEADLINE)
            return wire[r].allgather(t, name=name)
        z = ZeroSharded(USES, OWNED, SHAPES, comms[r], optim_cfg(0.0), AggregationConfig(), 3)
        ahead = GatherAhead(gather, timeout)
        z.gather_async = (ahead.start, ahead.finish)
        run = NumpyRunner(init(), 1)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        run.w.clear()
        t0 = time.monotonic()
        with pytest.raises(HvdllmError if how == "stall" else RuntimeError) as e:
            z.step(run, [data[0][r][0][0]], [data[0][r][0][1]], 1e-2)
        return "\n".join([str(e.value), *getattr(e.value, "__notes__", [])]), time.monotonic() - t0, ahead
    results = world.run(body)
    release.set()
    for msg, seconds, ahead in results:
        assert "the gather of unit 2's weights, issued one unit ahead in the forward, failed" in msg, msg
        assert ("not done within 0.3 s (train.step_timeout)" if how == "stall" else "the wire broke") in msg, msg
        assert seconds < timeout + 5, seconds
        ahead.close()
        ahead._thread.join(DEADLINE)
        assert not ahead._thread.is_alive()
        with pytest.raises(HvdllmError, match="after the gather thread was stopped"):
            ahead.start(None, "zero.gather.0.f")


# the TensorFlow ShardedEngine --------------------------------------------------------------
V, T, BATCH, TF_STEPS = 256, 16, 8, 3
MODEL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", f"model.vocab_size={V}", f"model.block_size={T}",
         "optim.lr=3e-3", "optim.warmup_steps=0", "optim.grad_clip=0.5",   # clipping binds (norms ~1)
         f"train.steps={TF_STEPS}", "train.seed=1234", 'backend="tensorflow"']


@pytest.fixture(scope="module")
def tf_backend():
    import horovod.tensorflow  # noqa: F401  (installed by make env)
    from mpi4py import MPI

    import tf_backend
    tf_backend.init_horovod(MPI.COMM_WORLD)   # the np=1 reference's one-rank Collectives
    return tf_backend


def tf_cfg(sets, world=1):
    from hvdllm import config
    return config.validate(config.load(None, [*MODEL, *sets]), world_size=world)


def tf_batches():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, V, (BATCH, T)), rng.integers(0, V, (BATCH, T))) for _ in range(TF_STEPS + 1)]


def test_tensorflow_zero3_gathers_ahead_equals_np1_and_a_stall_names_the_unit(tf_backend):
    """Two simulated ranks of tf_backend.ShardedEngine at zero=3 (its GatherAhead, the gathers on
    the simulator's second group) equal np=1 at zero=0 (losses and gradient norms per step,
    clipping binding, the validation loss), every gather ahead beside the unit before it
    (Ahead); then a step whose unit 2 gather stalls fails naming it, and the failed step stopped
    the thread."""
    from hvdllm import lr as lr_schedule
    from hvdllm.layout import Layout
    data = tf_batches()
    ref_cfg = tf_cfg([])
    solo = tf_backend.Engine(ref_cfg, Layout.build(ref_cfg.parallel, 1, 0))
    want = [solo.train_step(x, y, lr_schedule.lr_at(s, ref_cfg.optim, TF_STEPS)) for s, (x, y) in
            enumerate(data[:TF_STEPS])]
    want = np.array([(r.loss, r.grad_norm) for r in want])
    assert want[:, 1].min() > ref_cfg.optim.grad_clip   # clipping binds
    ev = solo.evaluate(*data[TF_STEPS])
    want_val = ev.loss_sum / ev.tokens

    cfg = tf_cfg(["parallel.zero=3"], world=2)
    tfb = backend("tensorflow")
    world = World(2, timeout=60.0)
    comms, wire = tfb.group(world), tfb.group(world)
    release, per = threading.Event(), BATCH // 2

    def body(r):
        e = tf_backend.ShardedEngine(cfg, Layout.build(cfg.parallel, 2, r), comms[r])
        assert e.ahead is not None and e.zero.gather_async == (e.ahead.start, e.ahead.finish)
        watch = Ahead(e.zero, 1, TF_STEPS)
        e.ahead.gather = watch.gather(lambda t, name: wire[r].allgather(t, name=name))
        watched(e, watch)
        got = []
        for s, (x, y) in enumerate(data[:TF_STEPS]):
            res = e.train_step(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per],
                               lr_schedule.lr_at(s, cfg.optim, TF_STEPS))
            got.append((res.loss, res.grad_norm))
        watch.check_complete()
        e.ahead.gather = lambda t, name: wire[r].allgather(t, name=name)   # evaluation: not watched
        x, y = data[TF_STEPS]
        ev = e.evaluate(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per])
        total = e.allreduce_sum([ev.loss_sum, ev.tokens])

        def stalled(t, name):
            if unit_of(name) == 2:
                release.wait(DEADLINE)
            return wire[r].allgather(t, name=name)
        e.ahead.gather, e.ahead.timeout_s = stalled, 0.5
        with pytest.raises(HvdllmError, match="the gather of unit 2's weights, issued one unit ahead in the "
                                              "forward, failed: allgather 'zero.gather.2.f' not done within 0.5 s"):
            e.train_step(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], 1e-3)
        return np.array(got), float(total[0] / total[1]), e
    results = world.run(body)
    release.set()
    for rank, (got, val, e) in enumerate(results):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"rank {rank}: (loss, grad norm)")
        np.testing.assert_allclose(val, want_val, rtol=1e-5, err_msg=f"rank {rank}: validation loss")
        z = e.zero
        largest = sorted((4 * sum(z.layouts[v].total for v in z.needs[u]) for u in range(len(z.layouts))),
                         reverse=True)
        assert z.peak_param_bytes <= 4 * z.size + sum(largest[:2]), (z.peak_param_bytes, largest)
        assert e.ahead._closed   # the failed step stopped it; the stalled gather returned: it ends
        e.ahead._thread.join(DEADLINE)
        assert not e.ahead._thread.is_alive()
