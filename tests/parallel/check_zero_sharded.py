"""ZeRO-2 / ZeRO-3 (hvdllm/strategies/zero_sharded.py) under mpirun -np 4, and the 3-D grid under
-np 8, both backends in each launch (each launch pays the imports of torch, TensorFlow and
Horovod): run by tests/integration/test_zero_sharded.py, which reads the lines it prints.

On each rank, for each backend, one-rank engines of the process's own (its one-rank Horovod
process set) train the np=1 references at zero=0, and each layout's engines are built by
hvdllm.parallelize.build_engine, as the trainer builds them, and fed the batches the trainer
would feed them. Checked, each printed as one line:
  - zero=2 and zero=3 at dp=4, zero=3 at dp=2 x tp=2, and zero=2 / zero=3 inside pp=2 x dp=2
    pipeline stages (1F1B; zero=3 also interleaved), equal np=1: losses and gradient
    norms per step to 1e-5 relative (as DP), the validation loss, the whole weights; with
    clipping that binds and without, with accumulation (2 micro-batches per rank), with the
    optimizer offloaded to the host;
  - train.precision = 'fp16' (dynamic loss scaling) at zero=3 dp=4, zero=3 dp=2 x tp=2 and
    zero=2 / zero=3 inside pp=2 x dp=2 stages, rank 1's gradients overflowing at step
    OVERFLOW_STEP (the testing aid; under pp rank 1 is the last stage's, so the first stage skips
    on the pipeline's norm alone): every rank skips that step, as np=1 in fp16 skips it, ends with
    np=1's loss scale, and equals it (losses, gradient norms, the validation loss, to LOW_RTOL);
  - zero=3's peak parameter bytes per rank (its engine's count of the shards and the units
    materialised) <= the shards + the two largest units' needs, and below the whole model;
  - resume across stages and dp sizes: a sharded checkpoint saved at zero=3 dp=4, and one at
    pp=2 zero=3 dp=2 (every rank its ranges, nothing gathered) loads at zero=0 np=1 and at its own
    layout; a zero=0 np=1 state loads at each; each continues with the uninterrupted run's loss
    and norm;
  - a rank whose model differs gets an error naming it, on every rank, not a hang;
  - np=8, (dp, pp, tp) = (2, 2, 2): zero=3 and zero=2, each stage's tp slices sharded over its
    dp group, 1F1B with 2 micro-batches, clipping binding, equal np=1 (losses, norms, the
    validation loss, the weights), zero=3's peak parameter bytes as above; a sharded checkpoint
    saved there (pp x tp x dp files, nothing gathered) loads at zero=0 np=1 and at the grid, and
    np=1's state at the grid, each continuing with the uninterrupted run's loss and norm.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "tensorflow")
V, T, STEPS, BATCH = 256, 16, 3, 8
MODEL = ["model.n_layer=3", "model.n_embd=32", "model.n_head=4", f"model.vocab_size={V}", f"model.block_size={T}"]
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=2", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
          "train.threads=1", "train.seed=1234"]
NO_CLIP = ["optim.grad_clip=0"]            # else optim.grad_clip=1 binds at every step (norms ~2)
ACC = ["aggregation.accumulation=2"] + NO_CLIP
PP = ["parallel.pp=2", "parallel.microbatches=2"]    # 1F1B (the default schedule), dp=2
FP16 = 'train.precision="fp16"'
OVERFLOW_STEP = 1   # fp16: rank 1's gradients overflow at this step (np=1: its one rank's)
LOW_RTOL = 2e-2     # fp16 against np=1's fp16: the batch split changes which products round together
LAYOUTS = {  # name: (settings at np=4, the reference's settings)
    "zero2_dp4": (["parallel.zero=2"], []),
    "zero3_dp4": (["parallel.zero=3"], []),
    "zero2_dp4_noclip": (["parallel.zero=2", *NO_CLIP], NO_CLIP),
    "zero3_dp4_noclip": (["parallel.zero=3", *NO_CLIP], NO_CLIP),
    "zero3_dp4_accumulation": (["parallel.zero=3", *ACC], NO_CLIP),
    "zero3_dp4_offload": (["parallel.zero=3", "parallel.offload=optimizer"], []),
    "zero3_dp2_tp2": (["parallel.zero=3", "parallel.tp=2"], []),
    # float16 with loss scaling, an overflow at OVERFLOW_STEP on rank 1 (train); beside tp before
    # the pipelines (check_layouts says why)
    "zero3_dp4_fp16": (["parallel.zero=3", FP16], [FP16]),
    "zero3_dp2_tp2_fp16": (["parallel.zero=3", "parallel.tp=2", FP16], [FP16]),
    # each pipeline stage's units sharded over its dp group (ShardedStageBase): 1F1B, interleaved
    "zero2_pp2_dp2": (["parallel.zero=2", *PP], []),
    "zero3_pp2_dp2": (["parallel.zero=3", *PP], []),
    "zero3_pp2_dp2_interleaved_noclip": (["parallel.zero=3", *PP, "parallel.schedule=interleaved",
                                          "parallel.virtual_stages=2", *NO_CLIP], NO_CLIP),
    "zero2_pp2_dp2_fp16": (["parallel.zero=2", *PP, FP16], [FP16]),
    "zero3_pp2_dp2_fp16": (["parallel.zero=3", *PP, FP16], [FP16]),
}
GRID = ["parallel.tp=2", *PP]   # np=8: (dp, pp, tp) = (2, 2, 2), 1F1B, 2 micro-batches per dp rank
LAYOUTS_3D = {  # its own launch (a world of 8): each stage's tp slices sharded over its dp group
    "zero3_dp2_pp2_tp2": (["parallel.zero=3", *GRID], []),
    "zero2_dp2_pp2_tp2": (["parallel.zero=2", *GRID], []),
}

def cfg_of(sets, world=None):
    from hvdllm import config as config_mod
    return config_mod.validate(config_mod.load(None, [*MODEL, *COMMON, *sets]), world_size=world)


def batches():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, V, (BATCH, T)), rng.integers(0, V, (BATCH, T))) for _ in range(STEPS + 1)]


def train(engine, cfg, layout, steps=range(STEPS), after=None):
    """Per step (loss, grad norm) on this rank's part of the global batch; the validation loss.
    `after(step)` is called after each step. fp16: rank 1 (np=1: rank 0) overflows at
    OVERFLOW_STEP, whose norm is recorded as -1 (inf or nan), and a last row (scale, good steps)."""
    from hvdllm import lr as lr_schedule
    dp, d = layout.dp, layout.dp_rank
    per = BATCH // dp
    data = batches()
    out = []
    for step in steps:
        x, y = data[step]
        fp16 = cfg.train.precision == "fp16"
        if fp16 and step == OVERFLOW_STEP and (layout.world_size == 1 or layout.rank == 1):
            engine.inject_overflow = True
        res = engine.train_step(x[d * per:(d + 1) * per], y[d * per:(d + 1) * per],
                                lr_schedule.lr_at(step, cfg.optim, cfg.train.steps))
        assert res.skipped == (fp16 and step == OVERFLOW_STEP), (step, layout.rank, res.grad_norm)
        out.append((res.loss, res.grad_norm if not res.skipped else -1.0))
        if after:
            after(step)
    vx, vy = data[STEPS]
    ev = engine.evaluate(vx[d * per:(d + 1) * per], vy[d * per:(d + 1) * per])
    total = engine.allreduce_sum([ev.loss_sum, ev.tokens]) if dp > 1 else np.array([ev.loss_sum, ev.tokens])
    if engine.scaler is not None:   # the scale, halved once at the overflow: np=1's on every rank
        out.append((engine.scaler.scale, engine.scaler.good))
    return np.array(out), float(total[0] / total[1])


def solo(rt, be, sets):
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_solo_engine
    cfg = cfg_of(sets)
    return build_solo_engine(cfg, rt, be, ranks=[rt.rank]), cfg, Layout(world_size=1, rank=0, dp=1)


def built(rt, be, sets):
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    cfg = cfg_of(sets, rt.size)
    layout = Layout.from_config(cfg, rt.size, rt.rank)
    return build_engine(cfg, layout, rt, be), cfg, layout


def same_weights(got, want, what, atol=None):
    """Within 1e-3 of each array's scale (or `atol`): where a gradient is ~0 (attention's key bias)
    Adam turns float32 noise into moves of ~lr (launch_util.same_checkpoint says more); a wrong
    piece is O(1)."""
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for k, a in want.items():
        tol = 1e-3 * float(np.max(np.abs(a))) if atol is None else atol
        np.testing.assert_allclose(got[k], a, rtol=0, atol=tol, err_msg=f"{what}: {k}")


REFS = {}


def idle_barrier(rt):
    """A barrier that sleeps while it waits: MPI's blocking ones spin, and ranks spinning on
    shared cores slow the ranks still computing."""
    req = rt.comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def make_references(rt, be, ref_sets, teams):
    """np=1 at zero=0, for each settings list: per step (loss, norm), the validation loss, the
    whole weights, and the whole state after 2 steps (to resume from). The same numbers on
    every rank, so each is made by one team of `teams` (round robin; each member alone, the
    same numbers) and sent to the others by its first rank."""
    def one(sets):
        engine, cfg, layout = solo(rt, be, sets)
        half = {}
        steps, val = train(engine, cfg, layout, after=lambda s: half.update(engine.state_dict() if s == 1 else {}))
        return steps, val, engine.full_params(), half
    todo = list(dict.fromkeys(tuple(s) for s in ref_sets))
    mine = {key: one(list(key)) for i, key in enumerate(todo) if rt.rank in teams[i % len(teams)]}
    idle_barrier(rt)
    for i, key in enumerate(todo):
        REFS[(be.__name__, key)] = rt.comm.bcast(mine.get(key), root=teams[i % len(teams)][0])


def reference(rt, be, sets):
    return REFS[(be.__name__, tuple(sets))]


def check_layouts(backend, rt, be, layouts, teams):
    """Every layout trains first, then the references are made (make_references, by `teams`):
    the tp layers' allreduces are unnamed, and Horovod names them by a per-process count of its
    ops, so no rank may have issued more ops than its tp peers before a tp layout runs. Where a
    tp layout runs after the references (the 3-D grid's resume), the teams are the tp groups."""
    runs = {}
    for name, (sets, _) in layouts.items():
        t0 = time.perf_counter()
        engine, cfg, layout = built(rt, be, sets)
        assert type(engine).__name__ == ("ShardedPipelineEngine" if layout.pp > 1 else "ShardedEngine"), \
            type(engine)
        steps, val = train(engine, cfg, layout)
        runs[name] = (steps, val, engine.full_params(), engine.zero, cfg, layout, time.perf_counter() - t0)
    make_references(rt, be, [layouts[name][1] for name in runs], teams)
    for name, (steps, val, weights, z, cfg, layout, seconds) in runs.items():
        ref_sets = layouts[name][1]
        want_steps, want_val, want_weights, _ = reference(rt, be, ref_sets)
        low = cfg.train.precision == "fp16"
        if low:   # the same skipped step (its norm -1 on both) and the same final scale, exactly
            np.testing.assert_array_equal(steps[STEPS:], want_steps[STEPS:], err_msg=f"{backend} {name}: scale")
        rtol = LOW_RTOL if low else 1e-5
        np.testing.assert_allclose(steps, want_steps, rtol=rtol, err_msg=f"{backend} {name}: (loss, grad norm)")
        np.testing.assert_allclose(val, want_val, rtol=rtol, err_msg=f"{backend} {name}: validation loss")
        if set(weights) != set(want_weights):   # a later pipeline stage: its own layers (tp joined)
            assert cfg.parallel.pp > 1 and set(weights) < set(want_weights), (name, sorted(weights))
            want_weights = {k: want_weights[k] for k in weights}
        # fp16: where a gradient is ~0, AdamW turns rounding into moves of up to lr per step
        same_weights(weights, want_weights, f"{backend} {name}", atol=STEPS * cfg.optim.lr if low else None)
        if not ref_sets:
            assert want_steps[:, 1].min() > cfg.optim.grad_clip, (name, want_steps)   # clipping bound
        if cfg.parallel.pp > 1:   # this stage's state: what memory.rank_memory predicts for it
            from hvdllm import memory
            pred = memory.rank_memory(cfg, z.k)["stages"][layout.pp_rank]
            have = {"params": z.param_bytes(), "grads": 4 * z.size, "optimizer": z.state_bytes()}
            assert have == {k: pred[k] for k in have}, (name, have, pred)
            assert pred["live"] >= 4 * sum(z.layouts[u].total for u in z.defer) > 0 or not z.defer, (name, pred)
        if z.stage == 3:
            needs = sorted((4 * sum(z.layouts[v].total for v in z.needs[u]) for u in range(len(z.layouts))),
                           reverse=True)
            bound, whole = 4 * z.size + sum(needs[:2]), 4 * sum(lay.total for lay in z.layouts)
            assert z.peak_param_bytes <= bound, (name, z.peak_param_bytes, bound, whole)
            assert z.k < 4 or z.peak_param_bytes < whole, (name, z.peak_param_bytes, whole)   # 3 blocks
            print(f"{backend} {name}: peak parameter bytes {z.peak_param_bytes} <= shards {4 * z.size} + two "
                  f"largest units {sum(needs[:2])} (whole model part {whole})", flush=True)
        print(f"{backend} {name}: equals np=1 (rank {rt.rank}; losses {np.round(steps[:, 0], 4).tolist()}; "
              f"{seconds:.1f} s)", flush=True)


RESUMES = {  # the sharded layout's settings and name: its checkpoint -> zero=0 np=1 and itself; np=1 -> it
    "zero=3 dp=4": ["parallel.zero=3"],
    "pp=2 zero=3 dp=2": ["parallel.zero=3", *PP],
}
RESUMES_3D = {"dp=2 pp=2 tp=2 zero=3": ["parallel.zero=3", *GRID]}


def check_resume(backend, rt, be, folder, what, sets):
    """`sets` (2 steps) -> a sharded checkpoint (every rank its ranges, nothing gathered) ->
    zero=0 np=1 and `sets`, step 3; and zero=0 np=1 (2 steps) -> its whole state -> `sets`,
    step 3: the uninterrupted run's."""
    from hvdllm import checkpoint
    t0 = time.perf_counter()
    want, _, _, whole = reference(rt, be, [])
    z3, cfg, layout = built(rt, be, sets)
    train(z3, cfg, layout, steps=range(2))
    local, where = z3.shard_state()
    assert not [k for k, pl in where.items() if k != "optim.step" and (pl is None or "range" not in pl)], where
    out = Path(folder) / backend / what.replace(" ", "_")
    names = [checkpoint.shard_name(p, t, d) for p in range(layout.pp) for t in range(layout.tp)
             for d in range(layout.dp)]
    checkpoint.write_shard(out, 2, checkpoint.shard_name(layout.pp_rank, layout.tp_rank, layout.dp_rank),
                           local, where)
    idle_barrier(rt)
    if rt.rank == 0:
        checkpoint.finalize(out, 2, names, {"config": {}})
    idle_barrier(rt)
    state, _ = checkpoint.load(checkpoint.path_for(out, 2))
    assert sorted(state) == sorted(whole) and int(state["optim.step"]) == 2, sorted(set(state) ^ set(whole))
    for k, a in whole.items():   # moments of ~0 gradients move by float32 noise: 1e-3 of the scale
        np.testing.assert_allclose(state[k], a, rtol=0, atol=1e-3 * max(float(np.max(np.abs(a))), 1e-12),
                                   err_msg=f"{backend} {what} checkpoint: {k}")
    for case, make, source in (   # np=1 last: one rank's ops would shift its tp peer's names (above)
            (f"{what} -> {what}", lambda: built(rt, be, sets), state),
            (f"zero=0 np=1 -> {what}", lambda: built(rt, be, sets), whole),
            (f"{what} -> zero=0 np=1", lambda: solo(rt, be, []), state)):
        # one rank is np=1; in torch only: the TF checkpoint equals the np=1 state (above), and
        # its loading at zero=0 is the core's placement code, the same in both backends
        if case.endswith("np=1") and (rt.rank != 0 or backend != "torch"):
            continue
        engine, c, lay = make()
        engine.load_state_dict(source)
        got, _ = train(engine, c, lay, steps=[2])
        np.testing.assert_allclose(got[0], want[2], rtol=1e-5, err_msg=f"{backend} resume {case}")
        print(f"{backend} resume {case}: step 3 equals the uninterrupted run", flush=True)
    print(f"{backend} resume {what}: {time.perf_counter() - t0:.1f} s", flush=True)


def check_mismatch(backend, rt, be):
    """Rank 1 builds a wider model: every rank gets the error naming it (no collective hangs)."""
    from hvdllm.errors import HvdllmError
    width = 48 if rt.rank == 1 else 32
    try:
        built(rt, be, ["parallel.zero=3", f"model.n_embd={width}"])
    except HvdllmError as e:
        assert "different models" in str(e) and "rank 1" in str(e), e
        print(f"{backend} mismatched model: refused on rank {rt.rank} ({str(e)[:60]}...)", flush=True)
        return
    raise AssertionError("a rank with another model was not refused")


def main():
    sys.path.insert(0, str(ROOT))
    from hvdllm import backends, runtime
    from hvdllm.layout import Layout
    n = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    assert n in (4, 8), "run under mpirun -np 4 (the layouts of 4 ranks) or -np 8 (the 3-D grid)"
    if n == 4:   # tp and dp groups of dp2 x tp2 (pp2 x dp2's dp groups are the same)
        layouts, resumes, grid = LAYOUTS, RESUMES, Layout(4, 0, dp=2, tp=2)
        teams = [(r,) for r in range(n)]   # no tp layout after the references
    else:
        layouts, resumes, grid = LAYOUTS_3D, RESUMES_3D, Layout(8, 0, dp=2, pp=2, tp=2)
        teams = grid.all_groups("tp")
    groups = [(r,) for r in range(n)] + grid.all_groups("tp") + grid.all_groups("dp")   # the np=1 references' own sets
    folder = os.environ["ZERO_CHECK_DIR"]   # one folder every rank sees (the test's tmp_path)
    for backend in BACKENDS:
        be = backends.load(backend)
        be.configure(1)   # one compute thread per rank: 4 ranks share the cores
        if backend == "tensorflow":   # each engine traces its own functions: retracing is expected
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")
        rt = runtime.start(be, groups=groups)
        check_layouts(backend, rt, be, layouts, teams)
        for what, sets in resumes.items():
            check_resume(backend, rt, be, folder, what, sets)
        if n == 4:
            check_mismatch(backend, rt, be)
    # a rank's exit shuts Horovod down on every rank, failing the ops still in flight elsewhere
    # (one pipeline stage ends its last step before the other)
    idle_barrier(rt)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from hvdllm import runtime
    # a rank's exception ends every rank (MPI Abort) instead of leaving the others waiting on it
    runtime.run_guarded(lambda: None, lambda _: main())
