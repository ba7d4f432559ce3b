"""tf_backend in one process (a one-rank Horovod job on mpi4py's singleton), plus mpirun -np 2."""
import math
import sys
import textwrap

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf
from launch_util import mpirun_argv, run  # noqa: E402

import tf_backend as be  # noqa: E402
from hvdllm.config import Config  # noqa: E402
from hvdllm.layout import Layout  # noqa: E402
from hvdllm.params import init_params, param_shapes  # noqa: E402

V, T = 64, 16


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    be.init_horovod(MPI.COMM_WORLD)


def tiny_cfg(**optim) -> Config:
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size = 2, 32, 4, T, V
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def engine(cfg=None) -> "be.Engine":
    cfg = cfg or tiny_cfg()
    return be.Engine(cfg, Layout.build(cfg.parallel, world_size=1, rank=0))


def batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (b, T)), rng.integers(0, V, (b, T))


def test_parameters_match_the_shared_layout_and_init():
    cfg = tiny_cfg()
    model = be.GPT(cfg.model, seed=3)
    shapes = param_shapes(cfg.model)
    assert list(model.params) == list(shapes)
    init = init_params(cfg.model, 3)
    for name, var in model.params.items():
        assert tuple(var.shape) == shapes[name] and var.dtype == tf.float32
        np.testing.assert_array_equal(var.numpy(), init[name])


def test_logits_shape_and_initial_loss():
    model = be.GPT(tiny_cfg().model, seed=0)
    x, y = batch()
    logits = model(tf.constant(x))
    assert logits.shape == (4, T, V) and logits.dtype == tf.float32
    assert abs(float(model.loss(tf.constant(x), tf.constant(y))) - math.log(V)) < 0.1
    with pytest.raises(ValueError, match="block_size"):
        model(tf.zeros((1, T + 1), tf.int64))


def test_causal_mask_future_tokens_do_not_change_the_past():
    model = be.GPT(tiny_cfg().model, seed=0)
    x, _ = batch()
    x2 = x.copy()
    x2[:, 10:] = (x2[:, 10:] + 1) % V
    a, b = model(tf.constant(x)).numpy(), model(tf.constant(x2)).numpy()
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


def test_dropout_only_in_training():
    cfg = tiny_cfg()
    cfg.model.dropout = 0.5
    model, x = be.GPT(cfg.model, seed=0), tf.constant(batch()[0])
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    assert np.abs(model(x, training=True).numpy() - model(x).numpy()).max() > 1e-3


def numpy_adamw(p, g, m, v, step, lr, o, decay):
    """The contract's formula in float64."""
    if decay:
        p = p * (1 - lr * o.weight_decay)
    m = o.beta1 * m + (1 - o.beta1) * g
    v = o.beta2 * v + (1 - o.beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - o.beta2 ** step) + o.eps
    return p - lr / (1 - o.beta1 ** step) * m / denom, m, v


def not_key_bias(flat) -> np.ndarray:
    """Mask over the flat parameters leaving out the key bias (c_attn.bias[C:2C]): its true
    gradient is exactly 0 (softmax ignores a per-query constant), so Adam turns float32
    rounding noise there into +-lr moves that differ between any two computations."""
    keep = np.ones(flat.total, bool)
    for i, n in enumerate(flat.names):
        if n.endswith("c_attn.bias"):
            keep[flat.offsets[i] + 32:flat.offsets[i] + 64] = False
    return keep


def grads_of(eng, x, y):
    with tf.GradientTape() as tape:
        loss = eng.model.loss(tf.constant(x), tf.constant(y))
    return [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in tape.gradient(loss, eng.vars)]


def test_adamw_equals_numpy_formula():
    """Given gradients, three updates match the contract's arithmetic (decay only for ndim >= 2)."""
    o = tiny_cfg(weight_decay=0.1).optim
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(5, 3)), rng.normal(size=(3,))]
    vars_ = [tf.Variable(a.astype(np.float32)) for a in init]
    opt = be.engine.AdamW(vars_, o)
    p, m, s = [a.copy() for a in init], [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    for step, lr in [(1, 1e-2), (2, 5e-3), (3, 1e-3)]:
        g = [rng.normal(size=a.shape) * 1e-3 for a in init]
        opt.apply([tf.constant(a.astype(np.float32)) for a in g], tf.constant(lr, tf.float64))
        for i in range(2):
            p[i], m[i], s[i] = numpy_adamw(p[i], g[i], m[i], s[i], step, lr, o, i == 0)
    assert int(opt.step.numpy()) == 3
    np.testing.assert_allclose(np.concatenate([v.numpy().ravel() for v in vars_]),
                               np.concatenate([a.ravel() for a in p]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_train_step_equals_numpy_adamw_with_clipping(clip):
    eng = engine(tiny_cfg(grad_clip=clip, weight_decay=0.1))
    o = eng.cfg.optim
    p = [v.numpy().astype(np.float64) for v in eng.vars]
    m, s = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    for step, lr in [(1, 1e-2), (2, 5e-3)]:
        x, y = batch(step)
        g = grads_of(eng, x, y)
        norm = np.sqrt(sum((a * a).sum() for a in g))
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        res = eng.train_step(x, y, lr)
        assert res.grad_norm == pytest.approx(norm, rel=1e-5)
        for i, v in enumerate(eng.vars):
            p[i], m[i], s[i] = numpy_adamw(p[i], g[i] * coef, m[i], s[i], step, lr, o, v.shape.rank >= 2)
    if clip:
        assert coef < 1.0  # the clip really acted
    # Adam divides by sqrt(v): where a gradient is ~0 a float32 rounding difference between the
    # eager reference gradient and the compiled one moves p by up to ~lr * 1e-3.
    keep = not_key_bias(eng.flat)
    np.testing.assert_allclose(eng.flat_params()[keep], eng.flat.flatten(p)[keep], rtol=1e-4, atol=1e-5)


def test_evaluate_counts_tokens_and_leaves_state():
    eng = engine()
    x, y = batch(2)
    before = eng.state_dict()
    r = eng.evaluate(x, y)
    assert r.tokens == x.size and 0 <= r.correct <= x.size
    assert r.loss_sum / r.tokens == pytest.approx(float(eng.model.loss(tf.constant(x), tf.constant(y))), rel=1e-5)
    after = eng.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(eng.allreduce_sum(np.array([1.5, 2.0, 3.0])), [1.5, 2.0, 3.0])


def test_state_dict_round_trip_continues_identically():
    a = engine()
    assert set(a.state_dict()) == set(a.names) | {"optim.step"}  # no moments before a step
    for s in range(2):
        a.train_step(*batch(s), 1e-2)
    state = a.state_dict()
    assert int(state["optim.step"]) == 2 and state["optim.step"].dtype == np.int64
    assert all(state[f"optim.{k}.{n}"].dtype == np.float32 for n in a.names for k in "mv")
    b = engine(tiny_cfg())
    b.load_state_dict(state)
    ra, rb = a.train_step(*batch(5), 1e-2), b.train_step(*batch(5), 1e-2)
    assert ra.loss == rb.loss
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    b.load_state_dict({n: sa[n] * 0 + 0.5 for n in a.names})  # parameters only: moments stay
    assert int(b.state_dict()["optim.step"]) == 3 and b.state_dict()["wte"][0, 0] == 0.5


def test_generate_is_deterministic_and_crops_context():
    eng = engine()
    a = eng.generate([1, 2, 3], 2 * T, temperature=0.8, top_k=10, seed=7)
    assert a == eng.generate([1, 2, 3], 2 * T, temperature=0.8, top_k=10, seed=7)
    assert len(a) == 2 * T and all(0 <= t < V for t in a)
    assert a != eng.generate([1, 2, 3], 2 * T, temperature=0.8, top_k=10, seed=8)
    greedy = eng.generate([4], 3, temperature=0.0, top_k=0, seed=0)
    assert greedy[0] == int(np.argmax(eng.model(tf.constant([[4]])).numpy()[0, -1]))


def test_collectives_on_one_rank():
    c = be.Collectives()
    assert (c.rank, c.size) == (0, 1) and c.process_set is hvd.global_process_set
    x = tf.constant(np.linspace(-1, 1, 8, dtype=np.float32))
    out = c.allreduce(x, op="sum", compression="fp16", postscale=2.0)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), 2 * x.numpy(), atol=2e-3)
    g = c.grouped_allreduce([x, tf.constant([3.0, 4.0])], op="average", name="g")  # one dtype per group
    np.testing.assert_array_equal(g[1].numpy(), [3, 4])
    np.testing.assert_array_equal(c.broadcast(x, root=0, name="b").numpy(), x.numpy())
    np.testing.assert_array_equal(c.allgather(x, name="ag").numpy(), x.numpy())
    with pytest.raises(ValueError, match="aggregation.op"):
        c.allreduce(x, op="median")
    # Horovod's TF allreduce rejects bfloat16; the adapter allgathers the 16-bit patterns
    with pytest.raises(Exception, match="bfloat16 is not in the list"):
        hvd.allreduce(tf.cast(x, tf.bfloat16), op=hvd.Sum, process_set=hvd.global_process_set)
    for out in (c.allreduce(x, op="sum", compression="bf16", name="bf"),
                c.grouped_allreduce([x], op="average", compression="bf16", name="gbf")[0]):
        assert out.dtype == tf.float32
        np.testing.assert_allclose(out.numpy(), x.numpy(), rtol=1e-2)
    with pytest.raises(ValueError, match="adasum"):
        c.allreduce(x, op="adasum", compression="bf16")


def test_accumulation_equals_one_big_batch():
    x, y = batch(3, b=8)
    cfg = tiny_cfg()
    cfg.aggregation.accumulation = 2
    big, acc = engine(), engine(cfg)
    for _ in range(2):
        rb, ra = big.train_step(x, y, 1e-2), acc.train_step(x, y, 1e-2)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    keep = not_key_bias(big.flat)   # with today's numpy / Keras one key-bias element drifted 1.0e-5
    np.testing.assert_allclose(acc.flat_params()[keep], big.flat_params()[keep], rtol=1e-4, atol=1e-5)


def test_zero1_and_local_sgd_on_one_rank_follow_plain_adamw():
    plain = engine()
    cz, cl = tiny_cfg(), tiny_cfg()
    cz.parallel.zero, cl.localsgd.every = 1, 2
    zero, local = engine(cz), engine(cl)
    for s in range(3):
        ref = plain.train_step(*batch(s), 1e-2).loss
        assert zero.train_step(*batch(s), 1e-2).loss == pytest.approx(ref, rel=1e-5)
        assert local.train_step(*batch(s), 1e-2).loss == pytest.approx(ref, rel=1e-5)
    keep = not_key_bias(plain.flat)
    for other in (zero, local):  # numpy FlatAdamW vs the TF AdamW: float32 rounding only
        np.testing.assert_allclose(other.flat_params()[keep], plain.flat_params()[keep], rtol=1e-4, atol=1e-5)
    state = zero.state_dict()
    assert int(state["optim.step"]) == 3 and "localsgd.anchor" in local.state_dict()
    again = engine(cz)
    again.load_state_dict(state)
    assert again.train_step(*batch(9), 1e-2).loss == zero.train_step(*batch(9), 1e-2).loss


def test_build_engine_builds_the_data_parallel_engine():
    from hvdllm.parallelize import build_engine
    rt = type("Rt", (), {"process_set": lambda self, ranks: None})()
    cfg = tiny_cfg()
    engine = build_engine(cfg, Layout.build(cfg.parallel, 1, 0), rt, be)
    assert type(engine) is be.Engine and engine.lockstep and engine.max_steps is None


def test_configure_accepts_the_threads_already_set():
    be.configure(tf.config.threading.get_intra_op_parallelism_threads(), seed=1)  # same value: no error
    be.configure(0)


DP_SCRIPT = """
import numpy as np, sys
from mpi4py import MPI
sys.path[:0] = [{root!r}, {tests!r}, {tests!r} + "/integration"]
import tf_backend as be
from test_tf_backend import tiny_cfg, batch
from hvdllm.layout import Layout
rank, size = be.init_horovod(MPI.COMM_WORLD)[:2]
for comp in {comps!r}:   # one launch for every wire: start-up (TF, Horovod) paid once
    cfg = tiny_cfg(); cfg.aggregation.compression = comp
    cfg.train.seed = 1 + rank  # differing seeds: the initial broadcast must make ranks agree
    eng = be.Engine(cfg, Layout.build(cfg.parallel, size, rank))
    lo = slice(rank * 4, rank * 4 + 4)
    losses = [eng.train_step(*(a[lo] for a in batch(s, b=8)), 1e-2).loss for s in range(3)]
    np.savez({out!r} + f".{{comp}}.{{rank}}.npz", losses=losses, **eng.state_dict())
"""
WIRES = {"none": 2e-4, "fp16": 2e-2, "bf16": 5e-2}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Each wire's 3 steps at np=2 (one mpirun for all three): {comp: (rank 0's, rank 1's)}."""
    from launch_util import ROOT
    tmp = tmp_path_factory.mktemp("tf_dp")
    script = tmp / "dp.py"
    script.write_text(textwrap.dedent(DP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                       comps=list(WIRES), out=str(tmp / "r"))))
    r = run(mpirun_argv(2) + [sys.executable, str(script)], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    return {c: (np.load(tmp / f"r.{c}.0.npz"), np.load(tmp / f"r.{c}.1.npz")) for c in WIRES}


@pytest.mark.parallel
@pytest.mark.parametrize("comp", list(WIRES))
def test_two_ranks_equal_one_rank_with_double_batch(two_rank_runs, comp):
    rtol = WIRES[comp]
    a, b = two_rank_runs[comp]
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])  # replicas identical
    cfg = tiny_cfg()
    cfg.train.seed = 1  # rank 0's seed, whose weights were broadcast
    one = engine(cfg)
    np.testing.assert_allclose(a["losses"], [one.train_step(*batch(s, b=8), 1e-2).loss for s in range(3)], rtol=rtol)
    if comp == "none":
        np.testing.assert_allclose(a["wte"], one.state_dict()["wte"], rtol=rtol, atol=1e-4)
    else:  # Adam's normalisation turns wire rounding of tiny gradients into up-to-lr moves
        assert np.abs(a["wte"] - one.state_dict()["wte"]).mean() < 1e-3
