import pytest

from hvdllm.config import ParallelConfig
from hvdllm.errors import ConfigError
from hvdllm.layout import Layout


def test_dp_fills_world():
    lay = Layout.build(ParallelConfig(), world_size=4, rank=3)
    assert (lay.dp, lay.pp, lay.tp) == (4, 1, 1) and lay.dp_rank == 3
    assert lay.group("dp") == (0, 1, 2, 3)


def test_3d_grid_coords_and_groups():
    world = 8
    layouts = [Layout.build(ParallelConfig(dp=2, pp=2, tp=2), world, r) for r in range(world)]
    coords = {lay.coords() for lay in layouts}
    assert len(coords) == world  # every rank a distinct cell
    lay = layouts[5]  # rank 5 -> dp 1, pp 0, tp 1
    assert lay.coords() == (1, 0, 1)
    assert lay.group("tp") == (4, 5) and lay.group("pp") == (5, 7) and lay.group("dp") == (1, 5)
    for kind in ("dp", "pp", "tp"):
        groups = lay.all_groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(world))


def test_bad_product_names_key():
    with pytest.raises(ConfigError, match="parallel.dp"):
        Layout.build(ParallelConfig(dp=3), world_size=4, rank=0)


def test_role_ranks_follow_trainers():
    lay = Layout.build(ParallelConfig(), world_size=7, rank=5, servers=2, evaluators=1, generators=1)
    assert lay.n_trainers == 3 and lay.dp == 3
    assert lay.role_ranks("server") == (3, 4) and lay.role_ranks("evaluator") == (5,)
    assert lay.role() == "evaluator" and lay.role(6) == "generator" and lay.role(0) == "trainer"
    assert lay.all_groups("dp") == [(0, 1, 2)]
