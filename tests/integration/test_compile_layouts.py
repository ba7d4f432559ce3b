"""train.compile under the layouts it composes with, step by step against the np=1 run (losses,
gradient norms, validation losses):
- TensorFlow data parallelism: XLA-compiled loss and gradients with Horovod's allreduce outside
  the compiled function, np=2 (micro-batch b, batches made on the background thread:
  train.prefetch=2) against np=1 (batch 2b, each batch made in the loop: train.prefetch=0);
- torch pipeline parallelism: pp=2 (1F1B, 4 micro-batches), each stage compiling only its own
  blocks, against test_pipeline.py's eager np=1 reference (shared by the session);
- one mpirun -np 2 launch of this file (main below): torch and TensorFlow tp=2, zero=3 at dp=2
  and zero=2 at dp=2, and TensorFlow pp=2, each compiled and eager in the same process, against
  each other and against np=1 (see check_layout).
The torch compiled-equals-eager check in one process is tests/unit/test_compile.py."""
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))   # launch_util when this file is the mpirun script
from launch_util import mpirun_argv, run, same_run, train  # noqa: E402

TF_SETS = ["backend=tensorflow", "train.compile=true", "optim.grad_clip=0"]
DEEP = ["model.n_layer=4"]   # test_pipeline.py's model, so its reference is shared


@pytest.mark.integration
def test_tf_compiled_np2_equals_np1(tmp_path):
    r, ref = train(tmp_path, "np1", 1, TF_SETS + ["train.batch_size=8", "train.prefetch=0"])
    assert r.returncode == 0, r.stdout[-4000:]
    r, dp2 = train(tmp_path, "np2", 2, TF_SETS + ["train.batch_size=4", "train.prefetch=2"])
    assert r.returncode == 0, r.stdout[-4000:]
    # float32 sums in another order, as test_integration.py's np=2 check
    same_run(dp2, ref, rtol=1e-5, what="compiled np2")


@pytest.mark.integration
def test_torch_compiled_pipeline_equals_eager_single_process(tmp_path, reference):
    ref = reference(*DEEP, "backend=torch", "train.batch_size=8")
    r, d = train(tmp_path, "pp2", 2, DEEP + ["backend=torch", "parallel.pp=2", "parallel.microbatches=4",
                                             "train.batch_size=8", "train.compile=true"])
    assert r.returncode == 0, r.stdout[-4000:]
    # inductor's fused float32 reductions: measured ~1e-7 relative on the gradient norms
    same_run(d, ref, rtol=2e-5, what="torch compiled pp2")


# -- compiled against eager in the same layout and against np=1: one mpirun -np 2 launch ----------
# 4 blocks: under tp, dynamo's entries per piece of a block grow with the blocks (model.py); with
# fewer, a recompile limit too low for deeper models would pass unseen
V, T, STEPS, BATCH, N_LAYER, WIDTH = 256, 16, 3, 8, 4, 32
MODEL = [f"model.n_layer={N_LAYER}", f"model.n_embd={WIDTH}", "model.n_head=4", f"model.vocab_size={V}",
         f"model.block_size={T}"]
# optim.grad_clip's default 1 binds at every step (the np=1 norms are ~2: asserted)
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=2", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
          "train.threads=1", "train.seed=1234"]
LAYOUTS = {"torch": {"tp2": ["parallel.tp=2"], "zero3_dp2": ["parallel.zero=3"], "zero2_dp2": ["parallel.zero=2"]},
           "tensorflow": {"pp2": ["parallel.pp=2", "parallel.microbatches=2"], "tp2": ["parallel.tp=2"],
                          "zero3_dp2": ["parallel.zero=3"], "zero2_dp2": ["parallel.zero=2"]}}
# compiled against eager (same layout) and against np=1: inductor and XLA fuse and reorder float32
# reductions (the unit test's 2e-5), and the layouts' own sums differ from np=1's (1e-5)
RTOL = 3e-5


@pytest.mark.integration
def test_compiled_tp_zero_and_tf_pipeline_equal_eager_and_np1():
    t0 = time.monotonic()
    r = run(mpirun_argv(2) + [sys.executable, __file__], timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    for backend, layouts in LAYOUTS.items():
        for name in layouts:
            assert r.stdout.count(f"{backend} {name}: compiled equals eager and np=1") == 2, (name, r.stdout[-6000:])
    print("".join(line + "\n" for line in r.stdout.splitlines() if "compiled equals" in line)
          + f"one launch: {time.monotonic() - t0:.0f} s")


def cfg_of(backend, sets, compiled, world=None):
    from hvdllm import config
    return config.validate(config.load(None, [*MODEL, *COMMON, f'backend="{backend}"',
                                              f"train.compile={str(compiled).lower()}", *sets]), world_size=world)


def batches():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, V, (BATCH, T)), rng.integers(0, V, (BATCH, T))) for _ in range(STEPS + 1)]


def train_steps(engine, cfg, layout, after_step=lambda step: None):
    """Per step (loss, grad norm) of this rank's part of the global batch, then the validation
    loss over the job; after_step(step) after each step."""
    from hvdllm import lr as lr_schedule
    per, d, data, out = BATCH // layout.dp, layout.dp_rank, batches(), []
    for step in range(STEPS):
        x, y = data[step]
        res = engine.train_step(x[d * per:(d + 1) * per], y[d * per:(d + 1) * per],
                                lr_schedule.lr_at(step, cfg.optim, cfg.train.steps))
        out.append((res.loss, res.grad_norm))
        after_step(step)
    vx, vy = data[STEPS]
    ev = engine.evaluate(vx[d * per:(d + 1) * per], vy[d * per:(d + 1) * per])
    total = engine.allreduce_sum([ev.loss_sum, ev.tokens]) if layout.dp > 1 else np.array([ev.loss_sum, ev.tokens])
    return np.array(out), float(total[0] / total[1])


def torch_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def run_torch(rt, be, sets, compiled):
    """The layout's engine, trained; compiled: dynamo captures the blocks' graphs at the first
    step and none after it (a guard on ZeRO-3's swapped parameter storage, or any other per-step
    guard failure, would add graphs every step; past the recompile limit raise, not run eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    torch._dynamo.reset()   # one engine per process, as a training run: no earlier engine's graphs
    counters.clear()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    cfg = cfg_of("torch", sets, compiled, rt.size)
    layout = Layout.from_config(cfg, rt.size, rt.rank)
    engine = build_engine(cfg, layout, rt, be)
    if cfg.parallel.zero == 3:   # the parameters really move between husks and gathered vectors
        assert engine.husks, "zero=3 at dp=2 should swap storage"
    graphs = []
    steps, val = train_steps(engine, cfg, layout, after_step=lambda s: graphs.append(torch_graphs()))
    if compiled:
        assert graphs[0] >= N_LAYER and graphs == graphs[:1] * STEPS, f"graphs after each step: {graphs}"
    return steps, val, f"{graphs[0] / N_LAYER:g} graphs per block" if compiled else ""


def tf_compiled(engine, cfg, layout):
    """The engine's XLA functions, the arguments of each (for its HLO), and what they are: a
    pipeline stage's chunks (x, targets), ZeRO-2/3's units (x, targets, ZeRO-3's gathered
    weights), tp's pieces of each block between its collectives (the training ones; the
    evaluation's, training=False, are traced too)."""
    import tensorflow as tf
    if cfg.parallel.pp > 1:
        b, ends = BATCH // cfg.parallel.microbatches, [(c[0] == 0, N_LAYER + 1 in c) for c in engine.chunks]
        fns, what = engine.stage_fns, f"{len(engine.stage_fns)} XLA chunk(s) on this stage"
        args = [() for _ in ends]
    elif cfg.parallel.zero >= 2:
        b, units = BATCH // layout.dp, sorted(engine.uses)
        ends = [(u == 0, u == N_LAYER + 1) for u in units]
        fns, what = [engine.unit_fns[u] for u in units], f"{len(units)} XLA units"
        args = [([tf.constant(np.zeros(engine.shapes[n], np.float32)) for n in engine.uses[u]] if engine.recompute
                 else [],) for u in units]
    else:
        fns = list(engine.model.pieces.values())
        train = [k for k in engine.model.pieces if k[-1] is True]
        assert len(train) == 5 * N_LAYER, sorted(engine.model.pieces)
        h = tf.zeros((BATCH, T, WIDTH))
        return fns, [[h] * (2 if "residual" in k else 1) for k in engine.model.pieces], "5 XLA pieces per block"
    ins = [[tf.zeros((b, T), tf.int64) if first else tf.zeros((b, T, WIDTH)),
            tf.zeros((b, T), tf.int64) if last else None] for first, last in ends]
    return fns, [x + [a for a in extra if a is not None] for x, extra in zip(ins, args)], what


def run_tf(rt, be, sets, compiled):
    """The layout's engine, trained; compiled: each of its XLA functions (tf_compiled) holds no
    Horovod op and was traced once (not per micro-batch, unit call or step)."""
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    cfg = cfg_of("tensorflow", sets, compiled, rt.size)
    layout = Layout.from_config(cfg, rt.size, rt.rank)
    engine = build_engine(cfg, layout, rt, be)
    steps, val = train_steps(engine, cfg, layout)
    if not compiled:
        return steps, val, ""
    fns, args, what = tf_compiled(engine, cfg, layout)
    traces = [f.experimental_get_tracing_count() for f in fns]
    assert fns and traces == [1] * len(fns), traces
    for f, a in zip(fns, args):
        hlo = f.experimental_get_compiler_ir(*a)(stage="hlo")
        assert hlo.startswith("HloModule") and "horovod" not in hlo.lower(), hlo[:200]
    return steps, val, f"{what}, traced once"


def idle_barrier(rt):
    """A barrier that sleeps while it waits: MPI's spins, on cores the other rank computes on."""
    req = rt.comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def check_layout(backend, rt, be):
    """Each layout compiled and eager: (loss, grad norm) per step and the validation loss equal
    each other and np=1 (a one-rank engine of rank 0 / 1, eager) within RTOL; clipping binds. The
    layouts run before the reference: tp's allreduces are unnamed, and Horovod names them by a
    per-process count of its ops, so no rank may have issued more ops than the other before."""
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_solo_engine
    train_of = run_torch if backend == "torch" else run_tf
    runs = {}
    for name, sets in LAYOUTS[backend].items():
        t0 = time.perf_counter()
        runs[name] = [train_of(rt, be, sets, compiled) for compiled in (True, False)] + [time.perf_counter() - t0]
    maker = 0 if backend == "torch" else 1
    ref = None
    if rt.rank == maker:
        cfg = cfg_of(backend, [], False)
        ref = train_steps(build_solo_engine(cfg, rt, be, ranks=[rt.rank]), cfg, Layout(world_size=1, rank=0, dp=1))
    idle_barrier(rt)
    want, want_val = rt.comm.bcast(ref, root=maker)
    assert want[:, 1].min() > 1.0, f"the clip (optim.grad_clip=1) must bind: {want}"
    for name, ((got, got_val, how), (eager, eager_val, _), seconds) in runs.items():
        for what, a, b in (("eager", got, eager), ("np=1", got, want), ("eager vs np=1", eager, want)):
            np.testing.assert_allclose(a, b, rtol=RTOL, err_msg=f"{backend} {name}: compiled vs {what}")
        np.testing.assert_allclose([got_val, eager_val], [want_val] * 2, rtol=RTOL, err_msg=f"{backend} {name}: val")
        worst = max(float(np.max(np.abs(got - b) / np.abs(b))) for b in (eager, want))
        print(f"{backend} {name}: compiled equals eager and np=1 (rank {rt.rank}; {how}; worst relative "
              f"difference {worst:.1e}; losses "
              f"{np.round(got[:, 0], 4).tolist()}; compiled + eager {seconds:.1f} s)", flush=True)


def main():
    from hvdllm import backends, runtime
    assert int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) == 2, "run under mpirun -np 2"
    for backend in LAYOUTS:
        be = backends.load(backend)
        be.configure(1)   # one compute thread per rank: the ranks share the cores
        if backend == "tensorflow":   # each engine traces its own functions: retracing is expected
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")
        check_layout(backend, runtime.start(be, groups=[(0,), (1,)]), be)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from hvdllm import runtime
    runtime.run_guarded(lambda: None, lambda _: main())
