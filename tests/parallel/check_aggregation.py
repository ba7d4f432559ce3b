"""Conformance of the aggregation layer (issue 3), modelled on what Horovod's test/parallel asserts:
op semantics across dtypes and shapes, prescale/postscale, compression round trip and wire dtype,
grouped equals individual, reducescatter, accumulation arithmetic, clipping, and ranks that
disagree getting an error instead of a hang. Run under mpirun -np 1/2/4 and horovodrun --gloo,
for HVDLLM_BACKEND=torch|tensorflow (see tests/test_parallel.py).
"""
import os

import numpy as np
import pytest

from hvdllm import aggregation, runtime
from hvdllm.backends import load as load_backend
from hvdllm.config import AggregationConfig, OptimConfig
from hvdllm.optim import FlatAdamW, clip_coef

BACKEND = os.environ.get("HVDLLM_BACKEND", "torch")
be = load_backend(BACKEND)
RT = runtime.start(be)
C = be.Collectives()
NC = be.collectives.NumpyCollectives(C)
R, S = C.rank, C.size
SHAPES = [(1,), (17,), (3, 5), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["sum", "average"])
def test_op_semantics(shape, dtype, op):
    rng = np.random.default_rng(1)
    per_rank = [rng.normal(size=shape).astype(dtype) for _ in range(S)]
    out = NC.allreduce(per_rank[R], op=op, name=f"sem.{op}.{np.dtype(dtype).name}.{len(shape)}.{shape[0]}")
    want = np.sum(per_rank, axis=0) / (S if op == "average" else 1)
    np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    assert out.dtype == dtype and out.shape == shape


def test_predivide_equals_average():
    args = aggregation.reduce_args(AggregationConfig(predivide=float(max(S, 2))), S)
    assert args.op == "sum" and args.prescale * args.postscale * S == pytest.approx(1.0)
    x = np.full(8, float(R + 1), np.float32)
    got = NC.coll.allreduce(be_tensor(x), name="prediv", **args.kwargs())
    np.testing.assert_allclose(np.asarray(got), np.full(8, (S + 1) / 2), rtol=1e-6)


@pytest.mark.parametrize("compression,tol", [("fp16", 1e-3), ("bf16", 1e-2)])
def test_compression_round_trip_and_wire_dtype(compression, tol):
    x = np.linspace(-2, 2, 101).astype(np.float32) * (R + 1)
    out = NC.allreduce(x, op="average", name=f"comp.{compression}", compression=compression)
    assert out.dtype == np.float32  # restored after the wire
    np.testing.assert_allclose(out, np.linspace(-2, 2, 101) * (S + 1) / 2, rtol=tol, atol=tol)
    if compression == "fp16":
        wire = C._to_wire(be_tensor(x), "fp16")
        assert "float16" in str(wire.dtype)


def test_grouped_equals_individual_with_compression():
    xs = [np.random.default_rng(R * 3 + i).normal(size=(i + 2,)).astype(np.float32) for i in range(3)]
    for comp in ("none", "fp16"):
        grouped = C.grouped_allreduce([be_tensor(x) for x in xs], op="average", name=f"g.{comp}", compression=comp)
        for i, (g, x) in enumerate(zip(grouped, xs)):
            single = NC.allreduce(x, op="average", name=f"s.{comp}.{i}", compression=comp)
            np.testing.assert_allclose(np.asarray(g), single, rtol=1e-6 if comp == "none" else 2e-3, atol=1e-3)


def test_reducescatter_shards_the_sum():
    n = 4 * S
    x = np.arange(n, dtype=np.float32) * (R + 1)
    shard = NC.reducescatter(x, op="sum", name="rs")
    full = np.arange(n, dtype=np.float32) * S * (S + 1) / 2
    np.testing.assert_allclose(shard, full[R * 4:(R + 1) * 4])


def test_accumulation_arithmetic():
    """k micro-batches of loss/k then one average over S ranks = the mean over S*k micro-batches."""
    k = 3
    x = np.arange(6 * k).reshape(2 * k, 3)
    parts = aggregation.split_microbatches(x, x, k)
    assert len(parts) == k and all(p[0].shape == (2, 3) for p in parts)
    local = sum(float(p[0].mean()) / k for p in parts)
    got = NC.allreduce(np.array([local + R]), op="average", name="acc")[0]
    assert got == pytest.approx(x.mean() + (S - 1) / 2)


def test_global_norm_clipping_over_shards_equals_whole():
    """ZeRO's clipping: sum of shard squared norms over ranks = the whole gradient's norm."""
    g = np.random.default_rng(0).normal(size=10 * S).astype(np.float32)
    shard = g[R * 10:(R + 1) * 10]
    sq = NC.allreduce(np.array([np.dot(shard, shard)], np.float64), op="sum", name="norm")[0]
    assert np.sqrt(sq) == pytest.approx(np.linalg.norm(g), rel=1e-6)
    assert clip_coef(10.0, 1.0) == pytest.approx(1 / (10 + 1e-6)) and clip_coef(0.5, 1.0) == 1.0


def test_flat_adamw_matches_formula():
    o = OptimConfig(lr=0.1, weight_decay=0.5)
    p, g = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    opt = FlatAdamW(4, np.array([1, 1, 0, 0], bool), o)
    opt.step(p, g, 0.1)
    m, v = 0.1 * 0.5, 0.05 * 0.25
    step = 0.1 / 0.1 * m / (np.sqrt(v) / np.sqrt(0.05) + o.eps)
    np.testing.assert_allclose(p, [1 * (1 - 0.05) - step] * 2 + [1 - step] * 2, rtol=1e-6)


# ---- disagreement: an error on every rank, never a hang (op-order disagreement: check_stall.py)

def test_z1_mismatched_shapes_raise():
    x = np.zeros(3 + R, np.float32)
    if S == 1:
        assert NC.allreduce(x, name="mis.shape").shape == (3,)
        return
    with pytest.raises(Exception, match="(?i)mismatched"):
        NC.allreduce(x, name="mis.shape")


def test_z2_mismatched_dtypes_raise():
    x = np.zeros(3, np.float32 if R == 0 else np.float64)
    if S == 1:
        NC.allreduce(x, name="mis.dtype")
        return
    with pytest.raises(Exception, match="(?i)mismatched"):
        NC.allreduce(x, name="mis.dtype")


def be_tensor(x):
    if BACKEND == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(x))
    import tensorflow as tf
    return tf.constant(x)
