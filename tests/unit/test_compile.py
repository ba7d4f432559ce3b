"""train.compile changes no number beyond float32 reordering: two steps of a tiny GPT (the
checkpointing test's model and batches), compiled (torch.compile of each block with inductor;
TensorFlow's XLA on the loss and gradients; on each ZeRO-2/3 unit's forward; beside tp on
the pieces of each block between its collectives) against eager, in one process; losses and gradient
norms (clipping binding) agree within rtol 2e-5 and the weights within rtol 1e-4, atol 1e-5 (an AdamW step is 3e-3)
(inductor and XLA fuse and reorder float32 reductions, and AdamW's m / sqrt(v) magnifies that
where a gradient is ~0). Under torch, 'full' checkpointing recomputes a compiled block: the
same check."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
from test_activation_checkpointing import STEPS, B, T, V, make_cfg, trajectory

import tf_backend
import torch_backend
from hvdllm import config
from hvdllm.layout import Layout

RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def check_close(got, ref, what):
    np.testing.assert_allclose(got[0], ref[0], rtol=RTOL, err_msg=what)
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-4, atol=1e-5, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_compiled_equals_eager(backend):
    ref = trajectory("gpt2", backend, "none")
    assert np.all(ref[0][:, 1] > 0.05), "the clip must bind for the test to cover it"
    if backend == "torch":   # the compiled path really ran: dynamo captured the blocks' graphs
        from torch._dynamo.utils import counters
        counters.clear()
    check_close(trajectory("gpt2", backend, "none", train__compile="true"), ref, f"{backend} compiled")
    if backend == "torch":
        assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
        check_close(trajectory("gpt2", backend, "full", train__compile="true"), ref, "torch compiled + full")
    else:   # the loss and gradients really are one XLA module, and it holds no Horovod op
        cfg = make_cfg("gpt2", backend, "none", train__compile="true")
        engine = tf_backend.Engine(cfg, Layout.build(cfg.parallel, 1, 0))
        xs, ys = engine._micro(np.zeros((4, 32), np.int64), np.zeros((4, 32), np.int64))
        hlo = engine._compute.experimental_get_compiler_ir(xs, ys, None)(stage="hlo")
        assert hlo.startswith("HloModule") and "horovod" not in hlo.lower()


def sharded_trajectory(**extra):
    """trajectory()'s steps under torch's ZeRO-3 alone (dp = 1: each unit's storage resized to 0
    after it runs and refilled before), with dynamo's graph count after each step."""
    from torch._dynamo.utils import counters
    cfg = make_cfg("gpt2", "torch", "none", parallel__zero="3", **extra)
    engine = torch_backend.ShardedEngine(cfg, Layout.build(cfg.parallel, 1, 0))
    rng, out, graphs = np.random.default_rng(0), [], []
    for _ in range(STEPS):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        r = engine.train_step(x, y, lr=3e-3)
        out.append((r.loss, r.grad_norm))
        graphs.append(counters["stats"]["unique_graphs"])
    return np.array(out), graphs


def test_compiled_zero3_reads_each_step_s_storage_and_compiles_once():
    """The storage-swapping path of ZeRO-3 compiled: the unsharded eager run's losses and norms
    (a compiled block reading an earlier step's weights, or a freed storage, would not give them),
    and no graph after the first step (a guard on the swapped storage would recompile each step)."""
    import torch._dynamo
    ref = trajectory("gpt2", "torch", "none")[0]
    torch._dynamo.reset()   # graphs of earlier tests' models out of the count and the limit
    torch._dynamo.config.fail_on_recompile_limit_hit = True   # past the limit: raise, not run eager
    try:
        got, graphs = sharded_trajectory(train__compile="true")
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = False
    np.testing.assert_allclose(got, ref, rtol=RTOL, err_msg="torch compiled zero=3")
    assert graphs[0] >= 3 and graphs == graphs[:1] * STEPS, graphs   # 3 blocks


def tf_sharded_trajectory(zero, **extra):
    """trajectory()'s steps under TensorFlow's ZeRO-2 / ZeRO-3 alone (dp = 1: ZeRO-3 gathers
    each unit's weights, drops them after its forward and recomputes it in the backward), and
    the engine."""
    cfg = make_cfg("gpt2", "tensorflow", "none", parallel__zero=zero, **extra)
    engine = tf_backend.ShardedEngine(cfg, Layout.build(cfg.parallel, 1, 0))
    rng, out = np.random.default_rng(0), []
    for _ in range(STEPS):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        r = engine.train_step(x, y, lr=3e-3)
        out.append((r.loss, r.grad_norm))
    return np.array(out), engine


@pytest.mark.parametrize("zero", ["2", "3"])
def test_tf_compiled_zero_units_equal_eager_and_trace_once(zero):
    """Each ZeRO unit's forward one XLA function: the unsharded eager run's losses and norms
    (ZeRO-3: a function that captured its first call's gathered weights would compute the
    second step with the first step's), each traced once (not per step, nor again for the
    backward's recompute), and none holds a Horovod op. With dropout, the units draw the
    compiled unsharded engine's masks (XLA draws other masks than eager), ZeRO-3's recompute
    the forward's."""
    ref = trajectory("gpt2", "tensorflow", "none")[0]
    got, engine = tf_sharded_trajectory(zero, train__compile="true")
    np.testing.assert_allclose(got, ref, rtol=RTOL, err_msg=f"tf compiled zero={zero}")
    assert {u: f.experimental_get_tracing_count() for u, f in engine.unit_fns.items()} == dict.fromkeys(range(5), 1)
    h = tf_backend.from_host(np.zeros((B, T, 32), np.float32))
    for u, f in engine.unit_fns.items():
        x = tf_backend.from_host(np.zeros((B, T), np.int64)) if u == 0 else h
        y = tf_backend.from_host(np.zeros((B, T), np.int64)) if u == len(engine.uses) - 1 else None
        weights = [tf_backend.from_host(np.zeros(engine.shapes[n], np.float32)) for n in engine.uses[u]] \
            if engine.recompute else []
        hlo = f.experimental_get_compiler_ir(x, y, weights)(stage="hlo")
        assert hlo.startswith("HloModule") and "horovod" not in hlo.lower(), hlo[:200]
    drop = trajectory("gpt2", "tensorflow", "none", model__dropout="0.1", train__compile="true")[0]
    np.testing.assert_allclose(tf_sharded_trajectory(zero, train__compile="true", model__dropout="0.1")[0], drop,
                               rtol=RTOL, err_msg=f"tf compiled zero={zero}, dropout")


def tp_step(model, x, y):
    """One training forward and backward of the model: the loss and every parameter's gradient."""
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = model.loss(x, y, training=True)
    return float(loss), [np.array(tf.convert_to_tensor(g)) for g in tape.gradient(loss, list(model.params.values()))]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tf_compiled_tp_pieces_equal_eager(family):
    """TensorFlow beside tp = 2 (two ranks simulated in one process: tests/unit/simcoll.py):
    the pieces of each block between its tp collectives are XLA functions, five per block,
    each traced once and holding no Horovod op; the loss is the unsharded model's and each
    rank's gradients are its eager twin's (the tp collectives, f's backward allreduce included,
    run between the pieces; the engine's np=2 run: tests/integration/test_compile_layouts.py)."""
    import tensorflow as tf
    from simcoll import World, backend

    from tf_backend.model import GPT
    cfg = make_cfg(family, "tensorflow", "none")
    rng = np.random.default_rng(0)
    x, y = tf.constant(rng.integers(0, V, (B, T))), tf.constant(rng.integers(0, V, (B, T)))
    ref = tp_step(GPT(cfg.model, 5), x, y)[0]

    def rank(comm):
        runs = []
        for compiled in (False, True):
            model = GPT(cfg.model, 5, tp=tf_backend.TPGroup(comm))
            model.configure(make_cfg(family, "tensorflow", "none", train__compile=str(compiled).lower()).train)
            runs.append(tp_step(model, x, y))
        runs.append(tp_step(model, x, y))   # a second step's call: no new trace
        h = tf.zeros((B, T, 32))
        hlo = {k: f.experimental_get_compiler_ir(*[h] * (2 if "residual" in k else 1))(stage="hlo")
               for k, f in model.pieces.items()}
        return runs, {k: f.experimental_get_tracing_count() for k, f in model.pieces.items()}, hlo
    world = World(2, timeout=120)
    comms = backend("tensorflow").group(world)
    for (eager, got, again), traces, hlo in world.run(lambda r: rank(comms[r])):
        np.testing.assert_allclose([eager[0], got[0], again[0]], [ref] * 3, rtol=RTOL)
        for a, b in zip(got[1], eager[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert len(traces) == 5 * 3 and set(traces.values()) == {1}, traces   # 3 blocks
        assert all(t.startswith("HloModule") and "horovod" not in t.lower() for t in hlo.values())


def test_compile_accepted_where_wired_refused_where_not():
    def problems(*sets):
        try:
            config.validate(config.load(None, ["train.compile=true", "model.n_layer=2", *sets]))
        except config.ConfigError as e:
            return str(e)
        return ""
    # torch: beside tp (a graph break at each collective), ZeRO-2/3 and pipelines; TensorFlow's stages
    for sets in (['backend="torch"', "parallel.tp=2"], ['backend="torch"', "parallel.zero=2"],
                 ['backend="torch"', "parallel.zero=3", "parallel.tp=2"], ['backend="torch"', "parallel.pp=2"],
                 ['backend="tensorflow"', "parallel.pp=2"], ['backend="tensorflow"', "parallel.zero=2"],
                 ['backend="tensorflow"', "parallel.zero=3"], ['backend="tensorflow"', "parallel.tp=2"],
                 ['backend="tensorflow"', "parallel.zero=1", "parallel.tp=2"]):
        assert problems(*sets) == "", sets
    for sets, key in ((['backend="tensorflow"', "parallel.zero=2", "parallel.tp=2"], "parallel.zero with parallel.tp"),
                      (['backend="tensorflow"', "parallel.zero=3", "parallel.pp=2"], "parallel.zero with parallel.pp")):
        assert f"train.compile: not wired with {key} in TensorFlow yet; set train.compile = false there " \
               "or use the torch backend" in problems(*sets), sets
    assert "train.compile: not wired with model.layers yet; set train.compile = false there" \
        in problems('backend="torch"', 'model.layers="user_models:torch_lm"')
    with pytest.raises(config.ConfigError, match=r"train.prefetch: must be >= 0"):
        config.validate(config.load(None, ["train.prefetch=-1"]))
