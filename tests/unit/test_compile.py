"""train.compile changes no number beyond float32 reordering: a few steps of a tiny GPT, compiled
(torch.compile of each block with inductor; TensorFlow's XLA on the loss and gradients) against
eager, same seed and batches, in one process; losses and gradient norms (clipping binding) agree
within rtol 2e-5 (inductor and XLA fuse and reorder float32 reductions: measured differences
are ~1e-6). Under torch, 'full' checkpointing recomputes a compiled block: the same check."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest

import tf_backend
import torch_backend
from hvdllm import config
from hvdllm.layout import Layout

V, T, B, STEPS = 256, 16, 4, 3   # V: the byte tokenizer's (validation requires it)
RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def make_cfg(backend: str, *extra: str):
    sets = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", f"model.block_size={T}",
            f"model.vocab_size={V}", f'backend="{backend}"', "optim.grad_clip=0.05", "optim.warmup_steps=0",
            "optim.lr=3e-3", "train.seed=5", *extra]
    return config.validate(config.load(None, sets))


def trajectory(backend, *extra):
    cfg = make_cfg(backend, *extra)
    engine = (torch_backend if backend == "torch" else tf_backend).Engine(cfg, Layout.build(cfg.parallel, 1, 0))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        r = engine.train_step(x, y, lr=3e-3)
        out.append((r.loss, r.grad_norm))
    return np.array(out)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_compiled_equals_eager(backend):
    ref = trajectory(backend)
    assert np.all(ref[:, 1] > 0.05), "the clip must bind for the test to cover it"
    if backend == "torch":   # the compiled path really ran: dynamo captured the blocks' graphs
        from torch._dynamo.utils import counters
        counters.clear()
    got = trajectory(backend, "train.compile=true")
    if backend == "torch":
        assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    np.testing.assert_allclose(got, ref, rtol=RTOL, err_msg=f"{backend} compiled vs eager")
    if backend == "torch":
        ckpt = trajectory(backend, "train.compile=true", 'train.activation_checkpointing="full"')
        np.testing.assert_allclose(ckpt, ref, rtol=RTOL, err_msg="torch compiled + full checkpointing")


def test_compile_where_not_wired_names_the_fix():
    with pytest.raises(config.ConfigError, match=r"train.compile: not wired with parallel.pp yet"):
        config.validate(config.load(None, ['backend="tensorflow"', "train.compile=true", "parallel.pp=2",
                                           "model.n_layer=2"]))
    with pytest.raises(config.ConfigError, match=r"train.prefetch: must be >= 0"):
        config.validate(config.load(None, ["train.prefetch=-1"]))
