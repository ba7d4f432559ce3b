import json

import numpy as np
import pytest

from hvdllm import checkpoint, lr
from hvdllm.config import OptimConfig
from hvdllm.errors import CheckpointError
from hvdllm.strategies import tensor_parallel as tp_plan


def test_atomic_save_load_prune(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "optim.step": np.array(3)}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, state, {"x": 1}, keep=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    got, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 3 and meta["x"] == 1
    np.testing.assert_array_equal(got["a"], state["a"])
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    checkpoint.save(tmp_path, 3, {"a": np.zeros((2, 3))}, {})   # the same step again replaces it
    np.testing.assert_array_equal(checkpoint.load(checkpoint.latest(tmp_path))[0]["a"], 0)


def test_unfinished_checkpoint_is_ignored_and_corrupt_one_named(tmp_path):
    checkpoint.save(tmp_path, 5, {"a": np.zeros(2)}, {})
    # a crash after a writer's shard, before rank 0's manifest and rename: not a checkpoint
    checkpoint.write_shard(tmp_path, 6, checkpoint.shard_name(0, 0), {"a": np.ones(2)}, {})
    assert checkpoint.latest(tmp_path).name == "step_00000005"
    bad = tmp_path / "checkpoints" / "step_00000007"
    bad.mkdir()
    (bad / checkpoint.MANIFEST).write_text("{garbage")
    with pytest.raises(CheckpointError, match="step_00000007"):
        checkpoint.load(bad)


def test_old_single_file_checkpoints_load(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    np.savez(folder / "step_00000004.npz", a=np.arange(3), __meta__=np.array(json.dumps({"step": 4})))
    state, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 4 and list(state["a"]) == [0, 1, 2]


def test_shards_reassemble_under_any_split(tmp_path):
    """Writers at tp=2 and pp=2 (qkv-fused, column, row, vocab and replicated arrays); the
    loader rebuilds whole arrays and cuts tp=1, 2 and 4 slices equal to slicing the whole."""
    rng = np.random.default_rng(0)
    C = 8
    whole = {"h.0.attn.c_attn.weight": rng.normal(size=(C, 3 * C)), "h.0.mlp.c_fc.bias": rng.normal(size=4 * C),
             "h.0.mlp.c_proj.weight": rng.normal(size=(4 * C, C)), "wte": rng.normal(size=(16, C)),
             "h.1.ln_1.weight": rng.normal(size=C), "optim.step": np.array(7)}
    stage = {"h.0.attn.c_attn.weight": 0, "h.0.mlp.c_fc.bias": 0, "h.0.mlp.c_proj.weight": 0, "wte": 0,
             "h.1.ln_1.weight": 1, "optim.step": None}
    names = []
    for pp in (0, 1):
        for t in (0, 1):
            mine = {k: v for k, v in whole.items() if stage[k] in (pp, None) or k == "wte"}  # wte tied: both stages
            local = {k: tp_plan.shard(k, v, 2, t) for k, v in mine.items()}
            checkpoint.write_shard(tmp_path, 9, checkpoint.shard_name(pp, t), local, tp_plan.placements(local, 2, t))
            names.append(checkpoint.shard_name(pp, t))
    path = checkpoint.finalize(tmp_path, 9, names, {"layout": "dp1 x pp2 x tp2"})
    state, meta = checkpoint.load(path)
    assert meta["layout"] == "dp1 x pp2 x tp2" and sorted(state) == sorted(whole)
    for k, v in whole.items():
        assert state.shapes[k] == v.shape
        np.testing.assert_array_equal(state[k], v)
    for tp in (1, 2, 4):
        for r in range(tp):
            got = tp_plan.shard_state(state, tp, r)
            for k, v in whole.items():
                np.testing.assert_array_equal(got[k], tp_plan.shard(k, v, tp, r), err_msg=f"{k} tp={tp} r={r}")


def test_ranged_pieces_join_into_whole_arrays(tmp_path):
    """ZeRO-1 moments: each dp rank saves elements [a, b) of the raveled flat state it holds, cut
    across parameter boundaries; the loader joins them (also ranges of tp slices), and any other
    split is cut from the joined whole. A gap in the ranges is an error, not silent zeros."""
    from hvdllm import placement
    rng = np.random.default_rng(1)
    whole = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    flat = np.concatenate([whole["a"].ravel(), whole["b"].ravel()])   # 17 elements over 3 ranks
    names = []
    for d, (lo, hi) in enumerate([(0, 6), (6, 12), (12, 17)]):
        local, where, off = {}, {}, 0
        for n in ("a", "b"):
            a, b = max(lo, off), min(hi, off + whole[n].size)
            if a < b:
                local[n], where[n] = flat[a:b], placement.ranged(None, a - off, b - off, whole[n].shape)
            off += whole[n].size
        names.append(checkpoint.shard_name(0, 0, d))
        checkpoint.write_shard(tmp_path, 4, names[-1], local, where)
    assert names == ["pp0-tp0.npz", "pp0-tp0-dp1.npz", "pp0-tp0-dp2.npz"]
    state, _ = checkpoint.load(checkpoint.finalize(tmp_path, 4, names, {}))
    assert state.shapes["a"] == (3, 4) and state.shapes["b"] == (5,)
    np.testing.assert_array_equal(state["a"], whole["a"])
    np.testing.assert_array_equal(state["b"], whole["b"])
    np.testing.assert_array_equal(state.slice("a", placement.make(0, 3, 1)), whole["a"][1:2])

    # tp slices (axis 1, 2 parts), each saved as two ranges by two writers
    w = rng.normal(size=(4, 6))
    for t in (0, 1):
        pl = placement.make(1, 2, t)
        piece = placement.take(w, pl).ravel()
        for d, (a, b) in enumerate([(0, 5), (5, 12)]):
            checkpoint.write_shard(tmp_path, 5, checkpoint.shard_name(0, t, d), {"w": piece[a:b]},
                                   {"w": placement.ranged(pl, a, b, (4, 3))})
    names = [checkpoint.shard_name(0, t, d) for t in (0, 1) for d in (0, 1)]
    state, _ = checkpoint.load(checkpoint.finalize(tmp_path, 5, names, {}))
    assert state.shapes["w"] == (4, 6)
    np.testing.assert_array_equal(state["w"], w)

    # a tied weight held by two pipeline stages: two complete sets of ranges, cut differently
    wte = rng.normal(size=(5, 4))
    for stage, cuts in ((0, [(0, 7), (7, 20)]), (1, [(0, 13), (13, 20)])):
        for d, (a, b) in enumerate(cuts):
            checkpoint.write_shard(tmp_path, 7, checkpoint.shard_name(stage, 0, d), {"wte": wte.ravel()[a:b]},
                                   {"wte": placement.ranged(None, a, b, (5, 4))})
    names = [checkpoint.shard_name(p, 0, d) for p in (0, 1) for d in (0, 1)]
    state, _ = checkpoint.load(checkpoint.finalize(tmp_path, 7, names, {}))
    np.testing.assert_array_equal(state["wte"], wte)

    # a missing range is reported
    checkpoint.write_shard(tmp_path, 6, "x.npz", {"a": flat[:6]}, {"a": placement.ranged(None, 0, 6, (3, 4))})
    state, _ = checkpoint.load(checkpoint.finalize(tmp_path, 6, ["x.npz"], {}))
    with pytest.raises(CheckpointError, match="a: ranged pieces end at 6 of 12"):
        state["a"]


def test_missing_shard_names_the_shared_file_system(tmp_path):
    checkpoint.write_shard(tmp_path, 1, checkpoint.shard_name(0, 0), {"a": np.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="every node sees"):
        checkpoint.finalize(tmp_path, 1, [checkpoint.shard_name(0, 0), checkpoint.shard_name(0, 1)], {})


def test_shape_check():
    with pytest.raises(CheckpointError, match="w: shape"):
        checkpoint.check_compatible({"w": np.zeros((2, 2))}, {"w": (2, 3)}, "p")


def test_lr_schedule():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr.lr_at(0, o, 100) == pytest.approx(0.1)
    assert lr.lr_at(9, o, 100) == pytest.approx(1.0)
    assert lr.lr_at(100, o, 100) == pytest.approx(0.1)
    assert 0.1 < lr.lr_at(55, o, 100) < 1.0
