"""Collectives through a backend adapter, run under a launcher (not collected by plain pytest).

    mpirun -np 2 python -m pytest tests/parallel/check_collectives.py   (HVDLLM_BACKEND=torch|tensorflow)
    horovodrun -np 2 --gloo python -m pytest tests/parallel/check_collectives.py

Every rank runs every test; values depend on the rank so a wrong reduction shows.
"""
import os

import numpy as np
import pytest

from hvdllm import runtime
from hvdllm.backends import load as load_backend

BACKEND = os.environ.get("HVDLLM_BACKEND", "torch")
be = load_backend(BACKEND)
RT = runtime.start(be)
C = be.Collectives()
R, S = C.rank, C.size

if BACKEND == "torch":
    import torch

    def T(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    def N(t):
        return t.numpy()
else:
    import tensorflow as tf

    def T(a):
        return tf.constant(a)

    def N(t):
        return t.numpy()


def test_world_matches_launcher():
    assert S == RT.size and R == RT.rank
    expected = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "1")))
    assert S == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_allreduce_sum(dtype):
    x = (np.arange(12).reshape(3, 4) * (R + 1)).astype(dtype)
    out = N(C.allreduce(T(x), op="sum", name=f"sum.{np.dtype(dtype).name}"))
    np.testing.assert_array_equal(out, (np.arange(12).reshape(3, 4) * S * (S + 1) // 2).astype(dtype))
    assert out.dtype == dtype


def test_allreduce_average_and_scaling():
    x = np.full((5,), float(R), np.float32)
    avg = N(C.allreduce(T(x), op="average", name="avg"))
    np.testing.assert_allclose(avg, np.full(5, (S - 1) / 2), rtol=1e-6)
    scaled = N(C.allreduce(T(x + 1), op="sum", name="scaled", prescale=0.5, postscale=3.0))
    np.testing.assert_allclose(scaled, np.full(5, 1.5 * S * (S + 1) / 2), rtol=1e-6)


def test_broadcast_from_each_root():
    for root in range(S):
        x = np.full((2, 3), float(R * 10), np.float32)
        np.testing.assert_array_equal(N(C.broadcast(T(x), root=root, name=f"bc.{root}")),
                                      np.full((2, 3), float(root * 10)))


def test_allgather_uneven_first_dim():
    x = np.full((R + 1, 2), R, np.int64)
    out = N(C.allgather(T(x), name="ag"))
    expected = np.concatenate([np.full((r + 1, 2), r, np.int64) for r in range(S)])
    np.testing.assert_array_equal(out, expected)


def test_grouped_equals_individual():
    xs = [np.random.default_rng(R * 7 + i).normal(size=(i + 1, 3)).astype(np.float32) for i in range(4)]
    grouped = [N(t) for t in C.grouped_allreduce([T(x) for x in xs], op="average", name="grp")]
    single = [N(C.allreduce(T(x), op="average", name=f"one.{i}")) for i, x in enumerate(xs)]
    for g, s in zip(grouped, single):
        np.testing.assert_allclose(g, s, rtol=1e-6)


def test_fp16_compression_restores_dtype():
    x = np.linspace(-1, 1, 64, dtype=np.float32) * (R + 1)
    out = C.allreduce(T(x), op="sum", name="fp16", compression="fp16")
    assert N(out).dtype == np.float32
    np.testing.assert_allclose(N(out), np.linspace(-1, 1, 64) * S * (S + 1) / 2, rtol=2e-3, atol=2e-3)
