"""ZeRO-2 / ZeRO-3 (hvdllm/strategies/zero_sharded.py) on k simulated ranks in one process, on a
small numpy model of units written out by hand (an embedding, linear blocks, a head that borrows
the embedding's table, as the tied GPT head does): the sharded step equals the unsharded AdamW
step on the dp-averaged gradient (parameters and the logged norm, clipping binding or not, with
accumulation), fp16's loss-scaled step is the unscaled one and one rank's overflow skips the
step on every rank (shards and AdamW untouched), stage 3 holds no more parameter bytes than its
shards plus two units' needs and nothing whole after a step, the checkpoint ranges join into the
whole state and load at another dp size to continue the same trajectory, and offload takes the
same steps on the host."""
import numpy as np
import pytest
from simcoll import World, run_group

from hvdllm import params, placement
from hvdllm.config import AggregationConfig, OptimConfig
from hvdllm.flat import FlatLayout
from hvdllm.optim import FlatAdamW, clip_coef
from hvdllm.strategies.zero_sharded import ZeroSharded

V, C, B, L = 7, 5, 3, 2      # vocabulary, width, batch, blocks (prime-ish sizes: every k pads)
USES = [["wte"]] + [[f"h.{i}.w", f"h.{i}.b"] for i in range(L)] + [["ln.g", "wte"]]
OWNED = [["wte"]] + [[f"h.{i}.w", f"h.{i}.b"] for i in range(L)] + [["ln.g"]]
SHAPES = {"wte": (V, C), **{n: s for i in range(L) for n, s in ((f"h.{i}.w", (C, C)), (f"h.{i}.b", (C,)))},
          "ln.g": (C,)}
ALL = FlatLayout(SHAPES)
LRS = [1e-2, 3e-2, 2e-2]


def init():
    rng = np.random.default_rng(7)
    return {n: (rng.normal(size=s) * 0.5).astype(np.float32) for n, s in SHAPES.items()}


def batches(k, steps, mbs, seed=0):
    """[step][rank][micro-batch] = (ids, targets)."""
    rng = np.random.default_rng(seed)
    return [[[(rng.integers(0, V, B), rng.normal(size=(B, V)).astype(np.float32)) for _ in range(mbs)]
             for _ in range(k)] for _ in range(steps)]


class NumpyRunner:
    """The Runner of zero_sharded.py on the model above; `w` holds the whole parameters that are
    materialised (stage 3: only while a unit needs them: a read of a freed one fails)."""

    def __init__(self, w, mbs):
        self.w, self.mbs = dict(w), mbs

    def concat_flat(self, ts):
        return np.concatenate([np.asarray(t, np.float32).reshape(-1) for t in ts])

    def load_unit(self, names, flat):
        sizes = [int(np.prod(SHAPES[n])) for n in names]
        for n, piece in zip(names, np.split(flat, np.cumsum(sizes)[:-1])):
            self.w[n] = piece.reshape(SHAPES[n]).copy()

    def free_unit(self, names):
        for n in names:
            self.w.pop(n, None)

    def unit_forward(self, u, x, target):
        w = self.w
        if u == 0:
            return w["wte"][x], x
        if u <= L:
            return x @ w[f"h.{u - 1}.w"] + w[f"h.{u - 1}.b"], x
        logits = (x * w["ln.g"]) @ w["wte"].T
        loss = np.float32(0.5) * np.sum((logits - target) ** 2) / np.float32(B * self.mbs)
        return loss, (x, logits, target)

    def unit_backward(self, u, h, dy):
        w = self.w
        if u == 0:
            d = np.zeros((V, C), np.float32)
            np.add.at(d, h, dy)
            return None, [d]
        if u <= L:
            return dy @ w[f"h.{u - 1}.w"].T, [h.T @ dy, dy.sum(0)]
        x, logits, t = h
        dl = (logits - t) / np.float32(B * self.mbs)
        if dy is not None:   # fp16: the backward starts from the loss scale (a float)
            dl = dl * np.float32(dy)
        z = x * w["ln.g"]
        dz = dl @ w["wte"]
        return dz * w["ln.g"], [np.sum(dz * x, 0), dl.T @ z]

    def whole_grads(self, mb):
        """The unsharded gradient of one micro-batch (the reference)."""
        xs, saved = mb[0], {}
        x = xs
        for u in range(L + 2):
            x, saved[u] = self.unit_forward(u, x, mb[1] if u == L + 1 else None)
        g, dy = {}, None
        for u in range(L + 1, -1, -1):
            dy, grads = self.unit_backward(u, saved[u], dy)
            for n, a in zip(USES[u], grads):
                g[n] = g[n] + a if n in g else a
        return g


def cfg(clip):
    return OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=clip)


def reference(data, clip, steps, w=None):
    """One process, whole model: the dp-averaged gradient, its norm, clipping, FlatAdamW."""
    w = dict(init() if w is None else w)
    opt = FlatAdamW(ALL.total, ALL.decay_mask(), cfg(clip))
    p, norms = ALL.flatten(w), []
    for t in range(steps):
        run = NumpyRunner(ALL.unflatten(p), len(data[t][0]))
        per_rank = []
        for rank_mbs in data[t]:
            acc = None
            for mb in rank_mbs:
                g = ALL.flatten(run.whole_grads(mb))
                acc = g if acc is None else acc + g
            per_rank.append(acc)
        avg = per_rank[0].copy()
        for g in per_rank[1:]:
            avg += g
        avg /= np.float32(len(per_rank))
        norm = float(np.linalg.norm(avg.astype(np.float64)))
        opt.step(p, avg * np.float32(clip_coef(norm, clip)), LRS[t % len(LRS)])
        norms.append(norm)
    return ALL.unflatten(p), norms, opt


def sharded(k, data, clip, stage, steps, offload="none", state=None, t0=0):
    def body(comm):
        z = ZeroSharded(USES, OWNED, SHAPES, comm, cfg(clip), AggregationConfig(), stage, offload=offload)
        run = NumpyRunner(init(), len(data[0][0]))
        if state is None:
            z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        else:   # (the engine's load_state_dict; stage 2 then writes the whole model)
            z.load(state)
            if stage == 2:
                z.publish(run)
        if stage == 3:
            run.w.clear()
        norms = []
        for t in range(steps):
            mbs = data[t][comm.rank]
            _, norm = z.step(run, [m[0] for m in mbs], [m[1] for m in mbs], LRS[(t0 + t) % len(LRS)])
            norms.append(norm)
            if stage == 3:
                assert not run.w and not z.live and not z.pending, "whole units left after the step"
        return z.host_params(), norms, z, run
    return run_group(k, body)


def needs_bytes(z, u):
    return 4 * sum(z.layouts[v].total for v in z.needs[u])


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("clip,mbs", [(0.0, 1), (0.05, 1), (0.0, 2)], ids=["no-clip", "clipping", "accumulation"])
def test_sharded_step_equals_unsharded_step_on_the_average(stage, k, clip, mbs):
    data = batches(k, 3, mbs)
    want, want_norms, ref = reference(data, clip, 3)
    if clip:
        assert min(want_norms) > clip    # clipping binds at every step
    for rank, (got, norms, z, run) in enumerate(sharded(k, data, clip, stage, 3)):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-5, err_msg=f"rank {rank}: norm")
        for n in SHAPES:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {n}")
            if stage == 2:   # the model's replica equals the master shards
                np.testing.assert_array_equal(run.w[n], got[n])
        assert z.state_bytes() == 8 * sum(lay.padded_total(k) // k for lay in z.layouts)
        if stage == 3:
            largest = sorted((needs_bytes(z, u) for u in range(L + 2)), reverse=True)[:2]
            assert z.peak_param_bytes <= 4 * z.size + sum(largest), (z.peak_param_bytes, 4 * z.size, largest)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("clip,offload,mbs", [(0.0, "none", 1), (0.05, "none", 1), (0.05, "optimizer", 1),
                                              (0.0, "none", 2)], ids=["no-clip", "clipping", "offload", "accumulation"])
@pytest.mark.parametrize("via", ["step", "stage"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the overflow's inf * 0
def test_fp16_scaled_step_and_an_overflow_skipped_on_every_rank(stage, k, clip, offload, mbs, via):
    """train.precision = 'fp16': the loss's backward starts from the scale S (a power of two,
    as the scaler's) and step(scale=S) is the unscaled step; at step 1 the last rank's gradients
    overflow (step: its backward starts from inf, the testing aid's seed; stage: a pipeline
    stage's unit-at-a-time calls, ShardedStageBase's, the overflow entering at finish_stage):
    every rank's norm is non-finite, no rank's shard, moments or AdamW step count moves (stage
    2: the model's whole parameters neither), and the run goes on as the reference that never
    saw step 1."""
    S, bad, steps = 2.0 ** 12, 1, 4
    data = batches(k, steps, mbs)
    kept = [data[t] for t in range(steps) if t != bad]
    want, want_norms, ref = reference(kept, clip, steps - 1)

    def body(comm):
        z = ZeroSharded(USES, OWNED, SHAPES, comm, cfg(clip), AggregationConfig(), stage, offload=offload)
        run = NumpyRunner(init(), mbs)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        if stage == 3:
            run.w.clear()
        norms = []
        for t in range(steps):
            mine = data[t][comm.rank]
            before = (z._host_p(), np.array(z.ops.to_host(z.opt.state()["m"])), z.opt.state()["t"], dict(run.w))
            over, lr = t == bad and comm.rank == k - 1, LRS[(t - (t > bad)) % len(LRS)]
            if via == "step":
                _, norm = z.step(run, [m[0] for m in mine], [m[1] for m in mine], lr, scale=S,
                                 seed=float("inf") if over else S)
            else:
                z.begin_stage()
                for x, y in mine:
                    handles = []
                    for j in range(len(USES)):
                        x, h = z.stage_forward(run, j, x, y if j == len(USES) - 1 else None)
                        handles.append(h)
                    x = S   # the loss's backward from the scaler's scale, as ShardedStageBase.backward
                    for j in reversed(range(len(USES))):
                        x = z.stage_backward(run, j, handles[j], x)
                norm = z.finish_stage(run, lr, scale=S, overflow=over)
            if t != bad:
                norms.append(norm)
                continue
            assert not np.isfinite(norm), (comm.rank, norm)
            p, m, step, whole = before
            np.testing.assert_array_equal(z._host_p(), p)
            np.testing.assert_array_equal(z.ops.to_host(z.opt.state()["m"]), m)
            assert z.opt.state()["t"] == step == bad
            assert sorted(run.w) == sorted(whole) and all(np.array_equal(run.w[n], whole[n]) for n in whole)
        return z.host_params(), norms, z, z.moments()
    for rank, (got, norms, z, m) in enumerate(run_group(k, body)):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-5, err_msg=f"rank {rank}: norm")
        for n in SHAPES:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {n}")
        # Adam is blind to a gradient's scale (up to eps): a missed unscaling shows in the moments
        for n in SHAPES:
            np.testing.assert_allclose(m[f"optim.m.{n}"], ALL.unflatten(ref.m)[n], rtol=1e-4, atol=1e-8,
                                       err_msg=f"rank {rank}: optim.m.{n}")
        assert z.opt.state()["t"] == steps - 1


def test_stage3_gathers_and_reduces_per_unit():
    """Per micro-batch: one reduce-scatter per unit; allgathers: every unit in the forward (the
    embedding again for the tied head), every unit but the head in the backward (the head and the
    table it borrows stay whole from its forward into its backward); then one norm allreduce.
    Role snapshots (strategies/roles.py) then walk the units: one allgather per unit_host, and
    the units joined are the whole parameters."""
    w = World(2)
    comms = w.group()
    data = batches(2, 1, 1)

    def body(r):
        z = ZeroSharded(USES, OWNED, SHAPES, comms[r], cfg(0.0), AggregationConfig(), 3)
        run = NumpyRunner(init(), 1)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        run.w.clear()
        z.step(run, [data[0][r][0][0]], [data[0][r][0][1]], 1e-2)
        units = [z.unit_host(u) for u in range(len(OWNED))]
        assert [sorted(u) for u in units] == [sorted(names) for names in OWNED]
        return {n: a for u in units for n, a in u.items()}, z.host_params()
    for joined, whole in w.run(body):
        for n in SHAPES:
            np.testing.assert_array_equal(joined[n], whole[n], err_msg=n)
    assert w.groups[0].log == ([("allgather", "zero.gather")] * 5 + [("reducescatter.average", "zero.grads")]
                               + [("allgather", "zero.gather"), ("reducescatter.average", "zero.grads")] * 3
                               + [("allreduce.sum", "zero.norm")] + [("allgather", "zero.unit_params")] * 4
                               + [("allgather", "zero.state.params")]), w.groups[0].log


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_ranges_join_to_the_whole_state_and_load_at_another_dp_size(stage):
    """Two steps at k=2, saved as ranges (no communication); the ranges joined are the reference
    state; loaded at k=3 and at k=1 (whole arrays) the run continues as the uninterrupted one."""
    data = batches(3, 4, 1)
    two = [s[:2] for s in data[:2]]

    def body(comm):
        z = ZeroSharded(USES, OWNED, SHAPES, comm, cfg(0.05), AggregationConfig(), stage)
        run = NumpyRunner(init(), 1)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        for t in range(2):
            mb = two[t][comm.rank][0]
            z.step(run, [mb[0]], [mb[1]], LRS[t])
        return z.shard_state()
    pieces = run_group(2, body)
    assert "optim.step" in pieces[0][0] and "optim.step" not in pieces[1][0]
    joined = {}
    for key in {k for arrays, _ in pieces for k in arrays if k != "optim.step"}:
        joined[key] = placement.join_ranges([(arrays[key], where[key]) for arrays, where in pieces if key in arrays])
    joined["optim.step"] = pieces[0][0]["optim.step"]
    half, _, ref2 = reference(two, 0.05, 2)
    for n in SHAPES:
        np.testing.assert_allclose(joined[n], half[n], rtol=1e-5, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(joined[f"optim.m.{n}"], ALL.unflatten(ref2.m)[n], rtol=1e-4, atol=1e-7)
    for k in (3, 1):
        rest = [s[:k] for s in data[2:]]
        cont_want, cont_norms, _ = reference_from(joined, rest, 0.05, t0=2)
        for rank, (got, norms, _, _) in enumerate(sharded(k, rest, 0.05, stage, 2, state=joined, t0=2)):
            np.testing.assert_allclose(norms, cont_norms, rtol=1e-5, err_msg=f"k={k} rank {rank}")
            for n in SHAPES:
                np.testing.assert_allclose(got[n], cont_want[n], rtol=1e-5, atol=1e-6, err_msg=f"k={k} {n}")


def reference_from(state, data, clip, t0):
    """reference() continued at step t0 from a whole state (parameters, moments, step)."""
    p = ALL.flatten({n: state[n] for n in SHAPES})
    opt = FlatAdamW(ALL.total, ALL.decay_mask(), cfg(clip))
    opt.load(ALL.flatten({n: state[f"optim.m.{n}"] for n in SHAPES}),
             ALL.flatten({n: state[f"optim.v.{n}"] for n in SHAPES}), int(state["optim.step"]))
    norms = []
    for t, step_data in enumerate(data):
        run = NumpyRunner(ALL.unflatten(p), 1)
        per_rank = [ALL.flatten(run.whole_grads(r[0])) for r in step_data]
        avg = per_rank[0].copy()
        for g in per_rank[1:]:
            avg += g
        avg /= np.float32(len(per_rank))
        norm = float(np.linalg.norm(avg.astype(np.float64)))
        opt.step(p, avg * np.float32(clip_coef(norm, clip)), LRS[(t0 + t) % len(LRS)])
        norms.append(norm)
    return ALL.unflatten(p), norms, opt


@pytest.mark.parametrize("stage", [2, 3])
def test_offload_takes_the_same_steps_on_the_host(stage):
    data = batches(2, 3, 1)
    dev = sharded(2, data, 0.05, stage, 3)
    host = sharded(2, data, 0.05, stage, 3, offload="optimizer")
    for (a, na, _, _), (b, nb, z, _) in zip(dev, host):
        assert isinstance(z.opt.m, np.ndarray) and isinstance(z.p_host, np.ndarray)
        np.testing.assert_allclose(nb, na, rtol=1e-6)
        for n in SHAPES:
            np.testing.assert_allclose(b[n], a[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sets,key", [
    (["parallel.zero=4"], "parallel.zero"),
    (["parallel.zero=3", "parallel.zero_unit=layer"], "parallel.zero_unit"),
    (["parallel.zero=3", "parallel.offload=gpu"], "parallel.offload"),
    (["parallel.offload=optimizer"], "parallel.offload"),
    (["parallel.zero=3", "aggregation.op=sum"], "parallel.zero"),
    (["parallel.zero=2", "ps.servers=1"], "parallel.zero"),
    (["parallel.zero=3", "localsgd.every=2"], "localsgd.every"),
])
def test_what_zero2_and_zero3_refuse_is_named(sets, key):
    from hvdllm import config
    from hvdllm.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        config.validate(config.load(None, sets))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(key + ":"), e.value.problems


def test_units_of_the_built_in_model():
    """Embeddings, each block, the head; the tied head borrows wte, an untied one owns lm_head."""
    from hvdllm.config import ModelConfig
    from hvdllm.strategies.zero_sharded import units_of
    uses, owned = units_of(ModelConfig(n_layer=2, vocab_size=16))
    assert len(uses) == 4 and owned[0] == ["wte", "wpe"] and uses[3][-1] == "wte" and "wte" not in owned[3]
    llama = ModelConfig(n_layer=2, vocab_size=16, family="llama", tie_embeddings=False)
    _, owned = units_of(llama)
    assert owned[0] == ["wte"] and owned[3][-1] == "lm_head"
    assert sorted(n for names in owned for n in names) == sorted(params.param_shapes(llama))   # each once


@pytest.mark.parametrize("k", [2, 3])
def test_stage2_master_shard_is_what_memory_counts(k):
    """Stage 2 holds, beside the whole parameters, the flat master copy of its shards (`p`, what
    AdamW updates): memory.zero_state_bytes' "master" (4 bytes per element of one shard; each
    unit is padded alone, so at most one element per unit more); stage 3 has no second copy."""
    from hvdllm import memory
    w = World(k)
    comms = w.group()
    psi = sum(int(np.prod(s)) for s in SHAPES.values())

    def body(r):
        z = ZeroSharded(USES, OWNED, SHAPES, comms[r], cfg(0.0), AggregationConfig(), 2)
        run = NumpyRunner(init(), 1)
        z.init_params([run.concat_flat([run.w[n] for n in names]) for names in OWNED])
        return z.p.nbytes
    for held in w.run(body):
        want = memory.zero_state_bytes(psi, k, 2)["master"]
        assert want <= held <= want + 4 * len(OWNED)
    assert memory.zero_state_bytes(psi, k, 3)["master"] == 0
