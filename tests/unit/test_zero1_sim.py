"""ZeRO-1 (hvdllm/strategies/zero.py) on k simulated ranks in one process: the sharded step is
the unsharded FlatAdamW step on the dp-averaged gradient, the logged norm is the global norm,
clipping uses it, the ranks' checkpoint pieces reassemble the whole state, and that state loads
back at another dp size (dict or sharded checkpoint folder) and continues the same trajectory.
Each of these runs on numpy and on both backends' tensors (simcoll.backend): the strategy is
written once against `comm.ops`, and what trains is the torch / tf path, so that is what is
proved equal to the numpy reference.

Why the norm is checked, not only the parameters: Adam is invariant to the gradient's scale (up
to eps) and clipping rescales to the same norm anyway, so a sum where an average belongs moves
the parameters by ~2e-7 relative (float32 noise) -- only the norm and the moments show it (and so it is with the logged
grad_norm of a real run: tests/test_integration.py compares it)."""
import numpy as np
import pytest
from simcoll import BACKENDS, World, backend, run_group, run_group_on

from hvdllm import checkpoint, placement
from hvdllm.config import AggregationConfig, OptimConfig
from hvdllm.flat import FlatLayout
from hvdllm.optim import FlatAdamW, clip_coef
from hvdllm.strategies.zero import Zero1

# 127 elements (a prime): padded for every k > 1; 2-D arrays decay, 1-D ones do not
SHAPES = {"wte": (11, 6), "h.0.w": (6, 5), "h.0.b": (7,), "ln.g": (6,), "head": (6, 3)}
FLAT = FlatLayout(SHAPES)
STEPS, LRS = 4, [1e-2, 3e-2, 2e-2, 5e-3]
KS = [1, 2, 3, 4, 5, 8]


def cfg(clip):
    return OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=clip)


def grads(k, steps=STEPS, seed=0, n=FLAT.total):
    """grads[t][i]: rank i's gradient at step t (different per rank and step)."""
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=n).astype(np.float32) * (1 + i) for i in range(k)] for _ in range(steps)]


def p0():
    return np.random.default_rng(42).normal(size=FLAT.total).astype(np.float32)


def mean(gs):
    """The dp average as a ring of float32 sums in rank order would give it."""
    out = gs[0].copy()
    for g in gs[1:]:
        out += g
    return out / np.float32(len(gs))


def reference(g, clip, steps=STEPS, p=None, opt=None):
    """One process, no sharding: FlatAdamW on the averaged, clipped gradient."""
    opt = opt or FlatAdamW(FLAT.total, FLAT.decay_mask(), cfg(clip))
    p = p0() if p is None else p.copy()
    norms = []
    for t in range(steps):
        avg = mean(g[t])
        norm = float(np.linalg.norm(avg.astype(np.float64)))
        opt.step(p, avg * np.float32(clip_coef(norm, clip)), LRS[t % len(LRS)])
        norms.append(norm)
    return p, norms, opt


def sharded(k, g, clip, fault=None, steps=STEPS, be="numpy"):
    """Returns per rank (parameters as numpy, norms, the Zero1)."""
    b = backend(be)

    def body(comm):
        z = Zero1(FLAT, comm, cfg(clip), AggregationConfig())
        p, norms = b.tensor(p0()), []
        for t in range(steps):
            p, norm = z.step(b.tensor(g[t][comm.rank]), p, LRS[t % len(LRS)])
            assert isinstance(norm, float)
            norms.append(norm)
        if be != "numpy":   # the vectors stayed the backend's own through every step
            assert not isinstance(p, np.ndarray) and not isinstance(z.opt.m, np.ndarray)
        return b.numpy(p), norms, z
    return run_group_on(b, k, body, fault=fault)


def check_equivalence(k, clip, fault=None, be="numpy"):
    g = grads(k)
    want, want_norms, ref = reference(g, clip)
    res = sharded(k, g, clip, fault, be=be)
    b = backend(be)
    for rank, (p, norms, z) in enumerate(res):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-6, err_msg=f"rank {rank}: norm")
        np.testing.assert_allclose(p, want, rtol=1e-6, atol=1e-7, err_msg=f"rank {rank}: parameters")
        # this rank's moments are the reference's [lo, hi) (zero padding past the end)
        lo, hi = FLAT.shard_range(k, rank)
        np.testing.assert_allclose(b.numpy(z.opt.m), FLAT.pad(ref.m, k)[lo:hi], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(b.numpy(z.opt.v), FLAT.pad(ref.v, k)[lo:hi], rtol=1e-5, atol=1e-12)
        assert z.opt.t == STEPS
    assert all(np.array_equal(res[0][0], p) for p, _, _ in res)        # replicas bit-identical
    return want_norms, res


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("clip", [0.0, 0.5, 1e6], ids=["no-clip", "clipping", "clip-inactive"])
def test_sharded_step_equals_unsharded_step_on_the_average(k, clip, be):
    norms, res = check_equivalence(k, clip, be=be)
    if clip == 0.5:
        assert min(norms) > clip          # clipping really acted at every step
    # each rank holds m and v for 1/k of the (padded) parameters only
    assert {z.state_bytes() for _, _, z in res} == {2 * 4 * FLAT.padded_total(k) // k}


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["no-clip", "clipping"])
def test_fp16_loss_scale_and_a_skipped_overflow(k, clip, be):
    """train.precision = 'fp16': gradients arrive times the loss scale S (a power of two, as the
    scaler's) and step(scale=S) is the unscaled step; where one rank's gradient overflows (an inf
    at step 1 on the last rank) every rank skips it: the norm is inf everywhere, the parameters
    and AdamW's step count stay, and the run goes on as the reference that never saw step 1."""
    S, bad = 2.0 ** 12, 1
    b, g = backend(be), grads(k)
    kept = [g[t] for t in range(STEPS) if t != bad]
    want, want_norms, ref = reference(kept, clip, steps=STEPS - 1)

    def body(comm):
        z = Zero1(FLAT, comm, cfg(clip), AggregationConfig())
        p, norms = b.tensor(p0()), []
        for t in range(STEPS):
            mine = g[t][comm.rank] * np.float32(S)
            if t == bad and comm.rank == k - 1:
                mine[5] = np.inf
            before = b.numpy(p)
            p, norm = z.step(b.tensor(mine), p, LRS[(t - (t > bad)) % len(LRS)], scale=S)
            if t == bad:
                assert not np.isfinite(norm) and z.opt.t == t and np.array_equal(b.numpy(p), before), comm.rank
            else:
                norms.append(norm)
        return b.numpy(p), norms, z
    for rank, (p, norms, z) in enumerate(run_group_on(b, k, body)):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-6, err_msg=f"rank {rank}: norm")
        np.testing.assert_allclose(p, want, rtol=1e-6, atol=1e-7, err_msg=f"rank {rank}: parameters")
        # Adam is blind to a gradient's scale (up to eps): a missed unscaling shows in the moments
        lo, hi = FLAT.shard_range(k, rank)
        np.testing.assert_allclose(b.numpy(z.opt.m), FLAT.pad(ref.m, k)[lo:hi], rtol=1e-5, atol=1e-9)
        assert z.opt.t == STEPS - 1


@pytest.mark.parametrize("be", BACKENDS)
def test_three_messages_per_step(be):
    """reducescatter (gradients), allreduce (one float: the squared norm), allgather (params)."""
    b = backend(be)
    w = World(3)
    comms = b.group(w)
    g = grads(3)

    def body(r):
        z = Zero1(FLAT, comms[r], cfg(1.0), AggregationConfig())
        z.step(b.tensor(g[0][r]), b.tensor(p0()), 1e-2)
    w.run(body)
    assert [kind for kind, _ in w.groups[0].log] == ["reducescatter.average", "allreduce.sum", "allgather"]


@pytest.mark.parametrize("fault", ["average_is_sum", "reducescatter_wrong_shard", "sum_is_local",
                                   "allgather_reversed"])
@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["no-clip", "clipping"])
def test_the_check_fails_when_a_collective_is_wrong(fault, clip):
    """The equivalence check can fail: each deliberately wrong collective is caught."""
    with pytest.raises(AssertionError):
        check_equivalence(3, clip, fault=fault)


@pytest.mark.parametrize("be", BACKENDS)
def test_norm_beside_tensor_and_pipeline_parallelism(be):
    """The non-plain norm: 'skip' parameters (a tied copy counted on another stage) left out,
    'replicated' ones counted once, and pp_sum adds the other stages' squares."""
    b = backend(be)
    k, other_stages = 3, 7.25
    kinds = {"wte": "skip", "ln.g": "replicated"}
    g = grads(k, steps=1)
    avg = mean(g[0])
    parts = FLAT.unflatten(avg)
    want = np.sqrt(sum(float(np.sum(parts[n].astype(np.float64) ** 2)) for n in SHAPES if n != "wte")
                   + other_stages)

    def body(comm):
        z = Zero1(FLAT, comm, cfg(0.5), AggregationConfig(), kind=lambda n: kinds.get(n, "sharded"),
                  pp_sum=lambda x: x + other_stages)
        p, norm = z.step(b.tensor(g[0][comm.rank]), b.tensor(p0()), 1e-2)
        return b.numpy(p), norm
    for p, norm in run_group_on(b, k, body):
        assert norm == pytest.approx(want, rel=1e-6)
        ref = FlatAdamW(FLAT.total, FLAT.decay_mask(), cfg(0.5))
        q = p0()
        ref.step(q, avg * np.float32(clip_coef(want, 0.5)), 1e-2)
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)


# -- ZeRO-1 beside tensor parallelism: a 2 (dp) x 2 (tp) grid of simulated ranks ------------------
TP_WHOLE = {"c_fc.weight": (6, 8), "c_fc.bias": (8,), "ln.g": (6,), "proj.weight": (8, 6)}
TP_SPLIT = {"c_fc.weight": placement.make(1, 2, 0), "c_fc.bias": placement.make(0, 2, 0),
            "proj.weight": placement.make(0, 2, 0)}   # index filled per tp rank; ln.g replicated


def tp_place(name, t):
    pl = TP_SPLIT.get(name)
    return None if pl is None else {**pl, "index": t}


@pytest.mark.parametrize("be", BACKENDS)
def test_zero1_beside_tensor_parallelism_equals_the_whole_model(tmp_path, be):
    """Rank (d, t) holds tp slice t and shards it over its dp group {(0, t), (1, t)}; its norm
    sums the slices' squares over the tp group and counts the replicated LayerNorm once. Every
    slice's step is the whole model's step, sliced; the checkpoint pieces (ranges of slices)
    rebuild the whole moments through a real sharded checkpoint folder."""
    b = backend(be)
    dp, tp, steps, clip = 2, 2, 3, 0.5
    whole = FlatLayout(TP_WHOLE)
    rng = np.random.default_rng(3)
    G = [[whole.unflatten(rng.normal(size=whole.total).astype(np.float32)) for _ in range(dp)] for _ in range(steps)]
    P0 = whole.unflatten(rng.normal(size=whole.total).astype(np.float32))
    # the reference: one process, whole arrays
    ref = FlatAdamW(whole.total, whole.decay_mask(), cfg(clip))
    p_ref, norms = whole.flatten(P0), []
    for s in range(steps):
        avg = mean([whole.flatten(G[s][d]) for d in range(dp)])
        norms.append(float(np.linalg.norm(avg.astype(np.float64))))
        ref.step(p_ref, avg * np.float32(clip_coef(norms[-1], clip)), LRS[s])
    # the grid
    w = World(dp * tp)
    dp_groups = {**b.group(w, [0, 2]), **b.group(w, [1, 3])}      # rank = d * tp + t
    tp_groups = {**b.group(w, [0, 1]), **b.group(w, [2, 3])}
    local = FlatLayout({n: placement.take(np.zeros(s), tp_place(n, 0)).shape for n, s in TP_WHOLE.items()})

    def body(r):
        d, t = divmod(r, tp)
        z = Zero1(local, dp_groups[r], cfg(clip), AggregationConfig(), tp=tp_groups[r],
                  kind=lambda n: "replicated" if n == "ln.g" else "sharded")
        p = b.tensor(local.flatten({n: placement.take(P0[n], tp_place(n, t)) for n in TP_WHOLE}))
        got = []
        for s in range(steps):
            g = local.flatten({n: placement.take(G[s][d][n], tp_place(n, t)) for n in TP_WHOLE})
            p, norm = z.step(b.tensor(g), p, LRS[s])
            got.append(norm)
        p = b.numpy(p)
        params = {n: a.copy() for n, a in local.unflatten(p).items()}
        out, where = z.shard_state(params, {n: tp_place(n, t) for n in TP_WHOLE})
        # the trainer's file naming: dp rank 0 of each tp position writes pp0-tpT.npz
        checkpoint.write_shard(tmp_path, steps, checkpoint.shard_name(0, t, d), out, where)
        return p, got
    res = w.run(body)
    want = whole.unflatten(p_ref)
    for r, (p, got) in enumerate(res):
        t = r % tp
        np.testing.assert_allclose(got, norms, rtol=1e-6, err_msg=f"rank {r}")
        for n, a in local.unflatten(p).items():
            np.testing.assert_allclose(a, placement.take(want[n], tp_place(n, t)), rtol=1e-6, atol=1e-7,
                                       err_msg=f"rank {r}: {n}")
    names = [checkpoint.shard_name(0, t, d) for t in range(tp) for d in range(dp)]
    state, _ = checkpoint.load(checkpoint.finalize(tmp_path, steps, names, {}))
    m, v = whole.unflatten(ref.m), whole.unflatten(ref.v)
    for n in TP_WHOLE:
        np.testing.assert_allclose(state[n], want[n], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(state[f"optim.m.{n}"], m[n], rtol=1e-5, atol=1e-9, err_msg=n)
        np.testing.assert_allclose(state[f"optim.v.{n}"], v[n], rtol=1e-5, atol=1e-12, err_msg=n)
    assert int(state["optim.step"]) == steps


# -- checkpoints: pieces, reassembly, loading at another k ----------------------------------------
def whole_state_from_pieces(res):
    """Every rank's shard_state joined, as a loader would: {name: whole array}."""
    pieces: dict[str, list] = {}
    plain = {}
    for rank, (p, _, z) in enumerate(res):
        out, where = z.shard_state(FLAT.unflatten(p.copy()))
        assert (rank == 0) == ("optim.step" in out) == ("wte" in out)   # params: dp rank 0 only
        for key, arr in out.items():
            if key.startswith(("optim.m.", "optim.v.")):
                pieces.setdefault(key, []).append((arr, where[key]))
            else:
                plain[key] = arr
    return {**plain, **{k: placement.join_ranges(v) for k, v in pieces.items()}}, pieces


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_shard_state_pieces_reassemble_the_whole_state(k):
    g = grads(k)
    want, _, ref = reference(g, 0.5)
    state, pieces = whole_state_from_pieces(sharded(k, g, 0.5))
    m, v = FLAT.unflatten(ref.m), FLAT.unflatten(ref.v)
    for n in SHAPES:
        np.testing.assert_allclose(state[f"optim.m.{n}"], m[n], rtol=1e-5, atol=1e-9, err_msg=n)
        np.testing.assert_allclose(state[f"optim.v.{n}"], v[n], rtol=1e-5, atol=1e-12, err_msg=n)
        np.testing.assert_allclose(state[n], FLAT.unflatten(want)[n], rtol=1e-6, atol=1e-7)
        # every element in exactly one piece: the ranges tile the parameter
        covered = sorted(tuple(pl["range"]) for _, pl in pieces[f"optim.m.{n}"])
        assert covered[0][0] == 0 and covered[-1][1] == int(np.prod(SHAPES[n]))
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered
    assert int(state["optim.step"]) == STEPS
    assert sum(arr.size for key, ps in pieces.items() if key.startswith("optim.m.") for arr, _ in ps) == FLAT.total


@pytest.mark.parametrize("k_save,k_load", [(2, 1), (2, 2), (2, 3), (3, 5), (4, 2), (1, 4)])
@pytest.mark.parametrize("source", ["dict", "checkpoint"])
@pytest.mark.parametrize("be", BACKENDS)
def test_load_shard_at_another_dp_size_continues_the_trajectory(tmp_path, k_save, k_load, source, be):
    """Saved by k_save ranks after STEPS steps, loaded by k_load ranks: two more steps equal the
    uninterrupted reference. 'checkpoint': the ranks' pieces written as shard files and read
    back through checkpoint.load (Sharded.slice straight from a file when the ranges match)."""
    clip = 0.5
    g = grads(k_save)
    _, _, ref = reference(g, clip)
    res = sharded(k_save, g, clip, be=be)
    if source == "dict":
        state, _ = whole_state_from_pieces(res)
    else:
        names = []
        for rank, (p, _, z) in enumerate(res):
            out, where = z.shard_state(FLAT.unflatten(p.copy()))
            names.append(checkpoint.shard_name(0, 0, rank))
            checkpoint.write_shard(tmp_path, STEPS, names[-1], out, where)
        state, _ = checkpoint.load(checkpoint.finalize(tmp_path, STEPS, names, {}))
    more = grads(k_load, steps=2, seed=9)
    p_saved = FLAT.flatten({n: np.asarray(state[n]) for n in SHAPES})
    # the reference continues from its own state
    q = p_saved.copy()
    for t in range(2):
        avg = mean(more[t])
        ref.step(q, avg * np.float32(clip_coef(float(np.linalg.norm(avg.astype(np.float64))), clip)), 1e-2)

    b = backend(be)

    def body(comm):
        z = Zero1(FLAT, comm, cfg(clip), AggregationConfig())
        z.load_shard(state, int(state["optim.step"]))
        p = b.tensor(p_saved)
        for t in range(2):
            p, _ = z.step(b.tensor(more[t][comm.rank]), p, 1e-2)
        return b.numpy(p)
    for p in run_group_on(b, k_load, body):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)


def test_loading_zero_moments_would_be_caught():
    """The loading check can fail: moments that were not loaded give another trajectory."""
    k, clip = 2, 0.0
    g = grads(k)
    _, _, ref = reference(g, clip)
    state, _ = whole_state_from_pieces(sharded(k, g, clip))
    zeros = {key: (np.zeros_like(a) if key.startswith("optim.") and key != "optim.step" else a)
             for key, a in state.items()}
    p = FLAT.flatten({n: state[n] for n in SHAPES})
    q = p.copy()
    ref.step(q, mean(grads(k, 1, 9)[0]), 1e-2)

    def body(comm):
        z = Zero1(FLAT, comm, cfg(clip), AggregationConfig())
        z.load_shard(zeros, STEPS)
        return z.step(grads(k, 1, 9)[0][comm.rank], p.copy(), 1e-2)[0]
    assert not np.allclose(run_group(k, body)[0], q, rtol=1e-4)


@pytest.mark.parametrize("be", BACKENDS)
def test_flat_shard_is_the_padded_vectors_slice(be):
    """FlatLayout.shard cuts shard i without padding the whole vector: the same elements as
    pad(...)[lo:hi], for every k up to past the vector's length (shards wholly in the padding)."""
    b = backend(be)
    v = np.arange(1, FLAT.total + 1, dtype=np.float32)
    t = b.tensor(v)
    for k in list(range(1, 12)) + [FLAT.total - 1, FLAT.total, FLAT.total + 1, 2 * FLAT.total]:
        padded = FLAT.pad(v, k)
        for i in range(k):
            lo, hi = FLAT.shard_range(k, i)
            np.testing.assert_array_equal(b.numpy(FLAT.shard(t, k, i, b.ops)), padded[lo:hi], err_msg=f"k={k} i={i}")
        np.testing.assert_array_equal(b.numpy(FLAT.pad(t, k, b.ops)), padded)
