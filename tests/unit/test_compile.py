"""train.compile changes no number beyond float32 reordering: two steps of a tiny GPT (the
checkpointing test's model and batches), compiled (torch.compile of each block with inductor;
TensorFlow's XLA on the loss and gradients) against eager, in one process; losses and gradient
norms (clipping binding) agree within rtol 2e-5 and the weights within rtol 1e-4, atol 1e-5 (an AdamW step is 3e-3)
(inductor and XLA fuse and reorder float32 reductions, and AdamW's m / sqrt(v) magnifies that
where a gradient is ~0). Under torch, 'full' checkpointing recomputes a compiled block: the
same check."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
from test_activation_checkpointing import make_cfg, trajectory

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


def test_compile_where_not_wired_names_the_fix():
    with pytest.raises(config.ConfigError, match=r"train.compile: not wired with parallel.pp yet"):
        config.validate(config.load(None, ['backend="tensorflow"', "train.compile=true", "parallel.pp=2",
                                           "model.n_layer=2"]))
    with pytest.raises(config.ConfigError, match=r"train.prefetch: must be >= 0"):
        config.validate(config.load(None, ["train.prefetch=-1"]))
