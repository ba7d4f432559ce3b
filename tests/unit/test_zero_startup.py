"""ZeRO-3's start-up without the whole model (hvdllm/strategies/zero_sharded.py's unit_values,
hvdllm/params.py's init_groups), in one process on numpy: the values drawn unit by unit equal
the whole-model init's (both families, a tp slice, an untied head), and a rank's shards built
from them equal the shards of the whole model, while the largest memory alive during the build
(tracemalloc, which sees every numpy allocation) stays within two shards and three units, far
below the whole model. The real engines' start-up on Horovod: tests/parallel/check_zero_startup.py."""
import tracemalloc

import numpy as np
import pytest
from simcoll import World

from hvdllm import params
from hvdllm.config import AggregationConfig, ModelConfig, OptimConfig
from hvdllm.flat import FlatLayout
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies.zero_sharded import ZeroSharded, unit_values, units_of

SEED = 1234


@pytest.mark.parametrize("model", [
    ModelConfig(n_layer=3, n_embd=32, n_head=4, block_size=16, vocab_size=96),
    ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=96, family="llama", n_kv_head=2,
                tie_embeddings=False),
], ids=["gpt2", "llama_untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_units_drawn_one_at_a_time_equal_the_whole_init(model, tp):
    cut = (lambda n, v: tp_plan.shard(n, v, tp, 1)) if tp > 1 else None
    whole = params.init_params(model, SEED, cut=cut)
    _, owned = units_of(model)
    got = list(params.init_groups(model, SEED, owned, cut))
    assert [list(g) for g in got] == owned
    for group in got:
        for n, v in group.items():
            assert v.dtype == np.float32 and np.array_equal(v, whole[n]), n
    for names, flat in zip(owned, unit_values(model, SEED, owned, cut)):
        assert np.array_equal(flat, np.concatenate([whole[n].reshape(-1) for n in names]))


def test_init_groups_names_a_missing_parameter():
    model = ModelConfig(n_layer=1, n_embd=8, n_head=2, block_size=4, vocab_size=8)
    with pytest.raises(ValueError, match="h.5.ln_1.weight"):
        list(params.init_groups(model, SEED, [["wte"], ["h.5.ln_1.weight"]]))


def test_zero3_startup_holds_shards_and_a_unit_not_the_model():
    k, rank = 8, 3
    model = ModelConfig(n_layer=24, n_embd=64, n_head=4, block_size=16, vocab_size=64)
    uses, owned = units_of(model)
    shapes = params.param_shapes(model)
    comm = World(k).group()[rank]   # rank identity only: building the shards sends nothing
    z = ZeroSharded(uses, owned, shapes, comm, OptimConfig(), AggregationConfig(), 3)
    tracemalloc.start()
    try:
        z.init_params(unit_values(model, SEED, owned))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shard, unit = 4 * z.size, 4 * max(lay.total for lay in z.layouts)
    model_bytes = 4 * params.count(model)
    print(f"start-up peak {peak} B: shards {shard} B, largest unit {unit} B, whole model {model_bytes} B")
    assert peak <= 2 * shard + 3 * unit, (peak, shard, unit)
    assert peak < model_bytes / 2, (peak, model_bytes)
    whole = params.init_params(model, SEED)
    want = np.concatenate([lay.shard(FlatLayout({n: shapes[n] for n in names}).flatten(whole), k, rank)
                           for lay, names in zip(z.layouts, owned)])
    assert np.array_equal(np.asarray(z.p), want)
