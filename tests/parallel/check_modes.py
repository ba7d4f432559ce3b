"""Aggregation modes against their definitions, under mpirun -np 2 and 4 (HVDLLM_BACKEND=torch|
tensorflow), through the backend's Collectives exactly as the engines call them.

Adasum (Maleki et al. 2020; Horovod's op=Adasum): for two gradients
    adasum(a, b) = (1 - a.b / (2|a|^2)) a + (1 - a.b / (2|b|^2)) b,
applied as a binary tree over the ranks (0,1), (2,3), then the pairs' results. So identical
gradients give the gradient itself (not twice it), orthogonal ones their sum.
bf16 on the wire: every rank's values rounded to bfloat16 (round to nearest even), summed in float32,
divided by the group size for 'average' -- never the exact fp32 average."""
import os

import numpy as np
import pytest

from hvdllm import backends, runtime

be = backends.load(os.environ.get("HVDLLM_BACKEND", "torch"))
RT = runtime.start(be)
COLL = be.NumpyCollectives(be.Collectives())
N, RANK = COLL.size, COLL.rank


def adasum(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    dot = a @ b
    return (1 - dot / (2 * (a @ a))) * a + (1 - dot / (2 * (b @ b))) * b


def tree(vectors):
    while len(vectors) > 1:
        vectors = [adasum(vectors[i], vectors[i + 1]) for i in range(0, len(vectors), 2)]
    return vectors[0]


def grads(seed_of_rank):
    return [np.random.default_rng(seed_of_rank(r)).standard_normal(1000).astype(np.float32) for r in range(N)]


@pytest.mark.parametrize("case", ["random", "identical", "orthogonal"])
def test_adasum_is_its_definition(case):
    if case == "random":
        g = grads(lambda r: 100 + r)
    elif case == "identical":
        g = grads(lambda r: 7)
    else:   # each rank's gradient lives on its own coordinates
        g = [np.zeros(1000, np.float32) for _ in range(N)]
        for r in range(N):
            g[r][r * 100:(r + 1) * 100] = np.random.default_rng(r).standard_normal(100)
    got = COLL.allreduce(g[RANK].copy(), op="adasum", name=f"adasum.{case}")
    want = tree(g)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    if case == "identical":
        np.testing.assert_allclose(got, g[0], rtol=1e-5)            # not N times it
    if case == "orthogonal":
        np.testing.assert_allclose(got, np.sum(g, axis=0), rtol=1e-5)
    if case == "random":   # it is neither the sum nor the average
        assert not np.allclose(got, np.mean(g, axis=0), rtol=1e-2)
        assert not np.allclose(got, np.sum(g, axis=0), rtol=1e-2)


def to_bf16(a):
    """float32 -> nearest bfloat16 (ties to even), back as float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("op", ["average", "sum"])
def test_bf16_wire_rounds_each_rank_then_sums_in_fp32(op):
    g = [a * np.float32(1.0 + 1e-3 * r) for r, a in enumerate(grads(lambda r: 200 + r))]
    got = COLL.allreduce(g[RANK].copy(), op=op, name=f"bf16.{op}", compression="bf16")
    want = np.sum([to_bf16(a) for a in g], axis=0, dtype=np.float32)
    if op == "average":
        want = want / np.float32(N)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    exact = np.sum(g, axis=0) / (N if op == "average" else 1)
    assert not np.array_equal(got, exact.astype(np.float32))   # it really went through bf16
    np.testing.assert_allclose(got, exact, rtol=2e-2, atol=2e-2)
