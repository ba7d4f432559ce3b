"""Tensor-parallel layers under mpirun -np 2 (HVDLLM_BACKEND=torch|tensorflow): the sharded GPT
computes the same loss and gradients as the whole model, and each transformer block issues exactly
two allreduces forward and two backward inside the tp group."""
import os

import numpy as np
from tests_tp_helpers import loss_and_grads

from hvdllm import runtime
from hvdllm.backends import load as load_backend
from hvdllm.config import ModelConfig
from hvdllm.strategies import tensor_parallel as tp_plan

BACKEND = os.environ.get("HVDLLM_BACKEND", "torch")
be = load_backend(BACKEND)
RT = runtime.start(be)


def model_cfg(n_layer):
    return ModelConfig(n_layer=n_layer, n_embd=32, n_head=4, block_size=16, vocab_size=64)


def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 64, (2, 16)), rng.integers(0, 64, (2, 16))



class Recorder:
    """The tp group's collectives, recording (operation, elements) of every call."""

    def __init__(self, coll):
        self.coll, self.calls = coll, []

    def __getattr__(self, name):
        fn = getattr(self.coll, name)

        def recorded(t, *args, **kwargs):
            self.calls.append((name, int(np.prod(tuple(t.shape)))))
            return fn(t, *args, **kwargs)
        return recorded


def test_tp_matches_whole_model_and_counts_collectives():

    tp = be.tensor_parallel.TPGroup(be.Collectives())
    tp.coll = rec = Recorder(tp.coll)
    counts = {}
    for n_layer in (2, 4):
        whole_loss, whole_grads, _ = loss_and_grads(be, model_cfg(n_layer), None, *batch())
        loss, grads, c = loss_and_grads(be, model_cfg(n_layer), tp, *batch())
        assert abs(loss - whole_loss) < 1e-5 * abs(whole_loss)
        for name, g in whole_grads.items():
            mine = tp_plan.shard(name, g, tp.size, tp.rank)
            np.testing.assert_allclose(grads[name], mine, rtol=1e-4, atol=1e-6, err_msg=name)
        counts[n_layer] = c
        # vocabulary-parallel loss: no allgather, and nothing as large as the full logits
        # (B*T*V); the largest collective is a block's activations (B*T*C)
        x, _ = batch()
        cfg = model_cfg(n_layer)
        assert all(op == "allreduce" for op, _ in rec.calls), rec.calls
        assert max(n for _, n in rec.calls) == x.size * cfg.n_embd < x.size * cfg.vocab_size
        rec.calls.clear()
    # two more blocks: exactly four more allreduces each way (2 per block per direction)
    assert counts[4]["forward"] - counts[2]["forward"] == 4, counts
    assert counts[4]["backward"] - counts[2]["backward"] == 4, counts
