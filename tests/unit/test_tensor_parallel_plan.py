import numpy as np
import pytest

from hvdllm.config import ModelConfig
from hvdllm.params import init_params, param_shapes
from hvdllm.strategies import tensor_parallel as tp


@pytest.mark.parametrize("n", [1, 2, 4])
def test_shard_unshard_round_trip_and_shapes(n):
    m = ModelConfig(n_layer=2, n_embd=16, n_head=4, block_size=8, vocab_size=32)
    full = init_params(m, 0)
    local = tp.local_shapes(param_shapes(m), n)
    for name, a in full.items():
        shards = [tp.shard(name, a, n, r) for r in range(n)]
        assert all(s.shape == local[name] for s in shards), name
        np.testing.assert_array_equal(tp.unshard(name, shards), a)


def test_styles():
    assert tp.style("h.3.attn.c_attn.weight") == "qkv_column"
    assert tp.style("h.0.mlp.c_proj.weight") == "row" and tp.style("h.0.mlp.c_proj.bias") == "replicate"
    assert tp.style("wte") == "vocab" and tp.style("wpe") == "replicate"


def test_qkv_shard_keeps_heads_together():
    C = 8
    w = np.arange(C * 3 * C).reshape(C, 3 * C)
    s = tp.shard("h.0.attn.c_attn.weight", w, 2, 1)
    q, k, v = np.split(w, 3, axis=1)
    np.testing.assert_array_equal(s, np.concatenate([q[:, 4:], k[:, 4:], v[:, 4:]], axis=1))


def test_problems_name_keys():
    assert "model.n_head" in tp.problems(ModelConfig(n_head=3), 2)[0]
