"""task.kind = 'classify' in both frameworks computes what hvdllm/task.py writes: the same initial
head (hvdllm.params), the pooled logits and the weighted loss against numpy, the same gradients
and AdamW steps, an unpadded sequence equal to its padded self, and train.init_from's backbone
under a fresh head (both frameworks in one CPU process, each with a one-rank Horovod)."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
import tensorflow as tf
import torch

import tf_backend
import torch_backend
from hvdllm import params, task
from hvdllm.config import Config
from hvdllm.finetune import FreshHead
from hvdllm.layout import Layout

V, T, C, K = 64, 12, 32, 3


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def cfg(pooling="last", weights=(), family="gpt2", tied=True) -> Config:
    c = Config()
    m = c.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size = 2, C, 4, T, V
    m.family, m.tie_embeddings = family, tied
    c.task.kind, c.task.num_labels, c.task.pooling, c.task.class_weights = "classify", K, pooling, list(weights)
    c.task.labels = ["a", "b", "c"]
    c.optim.lr, c.optim.warmup_steps = 3e-3, 0
    return c


def engines(c):
    layout = Layout.build(c.parallel, world_size=1, rank=0)
    return torch_backend.Engine(c, layout), tf_backend.Engine(c, layout)


def batch(seed, b=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, b)
    x = rng.integers(1, V, (b, T)) * (np.arange(T)[None, :] < lengths[:, None])   # right-padded with 0
    return x, np.stack([rng.integers(0, K, b), lengths], 1)


def numpy_loss(c, state, x, y):
    """hvdllm/task.py's head on the final-norm hidden states, from the torch model's backbone."""
    pt, _ = engines(c)
    pt.load_state_dict(state)
    with torch.no_grad():
        h = pt.model._ln(pt.model.run_layers(range(3), torch.from_numpy(x)), "ln_f").double().numpy()
    lengths = y[:, 1]
    pooled = (h[np.arange(len(x)), lengths - 1] if c.task.pooling == "last" else
              np.stack([h[b, :n].mean(0) for b, n in enumerate(lengths)]))
    z = pooled @ state["cls.weight"].astype(np.float64) + state["cls.bias"]
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y[:, 0]]
    w = np.asarray(c.task.class_weights or [1.0] * K)[y[:, 0]]
    return float((w * ce).mean()), z


@pytest.mark.parametrize("pooling,weights,family,tied", [("last", (), "gpt2", True),
                                                         ("mean", (1.0, 2.5, 0.5), "llama", False)])
def test_loss_gradients_and_steps_agree(pooling, weights, family, tied):
    c = cfg(pooling, weights, family, tied)
    pt, tfe = engines(c)
    names = list(params.param_shapes(task.model_config(c)))
    assert names[-2:] == ["cls.weight", "cls.bias"] and "lm_head" not in names   # a classifier has no LM head
    assert [n for n, _ in pt.named] == [n for n, _ in tfe.named] == names
    s0 = pt.state_dict()
    init = params.init_params(task.model_config(c), c.train.seed)
    for n in names:
        np.testing.assert_array_equal(s0[n], init[n], err_msg=n)
        np.testing.assert_array_equal(tfe.state_dict()[n], init[n], err_msg=n)
    x, y = batch(0)
    want, z = numpy_loss(c, s0, x, y)
    ev_p, ev_t = pt.evaluate(x, y), tfe.evaluate(x, y)
    for ev in (ev_p, ev_t):
        np.testing.assert_allclose(ev.logits, z, rtol=1e-4, atol=1e-5)
        assert ev.loss_sum / ev.tokens == pytest.approx(want, rel=1e-5) and ev.tokens == len(x)
        assert ev.correct == int((z.argmax(1) == y[:, 0]).sum())
    # padding is never read: one sequence alone, cut to its length, gives its padded logits
    n = int(y[0, 1])
    alone = pt.evaluate(x[:1, :n], y[:1]).logits
    np.testing.assert_allclose(alone, ev_p.logits[:1], rtol=1e-5, atol=1e-6)
    # gradients, then AdamW steps
    loss = pt.head.loss(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    with tf.GradientTape() as tape:
        tl = tfe.head.loss(tf.constant(x), tf.constant(y))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5) and float(tl) == pytest.approx(want, rel=1e-5)
    for (name, p), g in zip(pt.named, tape.gradient(tl, tfe.vars)):
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), p.grad.numpy(), rtol=1e-3, atol=2e-6, err_msg=name)
    for step in range(3):
        xs, ys = batch(10 + step)
        a, b = pt.train_step(xs, ys, 3e-3), tfe.train_step(xs, ys, 3e-3)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    sp, st = pt.state_dict(), tfe.state_dict()
    for k in ("cls.weight", "cls.bias", "ln_f.weight", "wte"):
        np.testing.assert_allclose(sp[k], st[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_init_from_loads_the_backbone_under_a_fresh_head():
    lm = Config()
    lm.model.n_layer, lm.model.n_embd, lm.model.n_head, lm.model.block_size, lm.model.vocab_size = 2, C, 4, T, V
    lm.model.tie_embeddings, lm.train.seed = False, 99
    pretrained = torch_backend.Engine(lm, Layout.build(lm.parallel, world_size=1, rank=0)).state_dict()
    c = cfg(tied=False)
    want_head = params.init_params(task.model_config(c), c.train.seed, names=task.HEAD)
    assert set(task.backbone_shapes(c)) == set(pretrained) - {"lm_head"} - {k for k in pretrained if "optim" in k}
    for eng in engines(c):
        eng.load_state_dict(FreshHead({k: v for k, v in pretrained.items() if not k.startswith("optim.")}, want_head))
        got = eng.state_dict()
        for k in task.backbone_shapes(c):
            np.testing.assert_array_equal(got[k], pretrained[k], err_msg=k)
        for k in task.HEAD:
            np.testing.assert_array_equal(got[k], want_head[k], err_msg=k)
        assert "lm_head" not in got
    # a tp rank cuts its slices from it as from a checkpoint: the backbone's split, the head whole
    from hvdllm.strategies import tensor_parallel as tp_plan
    fresh = FreshHead(dict(pretrained), want_head)
    part = tp_plan.shard_state(fresh, 2, 1, keys=list(task.backbone_shapes(c)) + list(task.HEAD))
    for k, a in part.items():
        np.testing.assert_array_equal(a, tp_plan.shard(k, fresh[k], 2, 1), err_msg=k)
    np.testing.assert_array_equal(part["cls.weight"], want_head["cls.weight"])
