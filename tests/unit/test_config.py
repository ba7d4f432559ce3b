import pytest

from hvdllm import config
from hvdllm.errors import ConfigError


def test_defaults_validate():
    config.validate(config.load(), world_size=1)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero2_and_zero3_validate_inside_pipeline_stages(zero):
    """parallel.pp > 1 with ZeRO-2/3 (strategies/zero_sharded.py ShardedStageBase: each stage's
    units sharded over its dp group) was refused until it was built; now any schedule takes it."""
    for schedule in (["parallel.schedule=1f1b"], ["parallel.schedule=interleaved", "parallel.virtual_stages=2"]):
        sets = [f"parallel.zero={zero}", "parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4", *schedule]
        cfg = config.validate(config.load(None, sets), world_size=4)
        assert cfg.parallel.zero == zero and cfg.parallel.pp == 2


def test_toml_then_set_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('backend = "tensorflow"\n[train]\nsteps = 7\nbatch_size = 3\n')
    cfg = config.load(f, ["train.steps=9", "optim.lr=1"])
    assert cfg.backend == "tensorflow" and cfg.train.steps == 9 and cfg.train.batch_size == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_every_problem_reported_at_once():
    cfg = config.load(None, ["model.n_embd=130", "backend=jax", "train.batch_size=0", "parallel.dp=3"])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg, world_size=2)
    msg = str(e.value)
    for key in ("model.n_embd", "backend", "train.batch_size", "parallel.dp"):
        assert key in msg
    assert len(e.value.problems) == 4 and e.value.exit_code == 2


def test_unknown_and_mistyped_keys_named():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["train.stepz=1", "model.n_layer=\"x\"", "nokey"])
    msg = str(e.value)
    assert "train.stepz: unknown key" in msg and "model.n_layer: expected int" in msg and "nokey" in msg


def test_key_in_the_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["parallel.servers=2", "train.lr=1e-3"])
    msg = str(e.value)
    assert "parallel.servers: unknown key" in msg and "did you mean ps.servers?" in msg
    assert "did you mean optim.lr?" in msg


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_toml_round_trip(tmp_path):
    cfg = config.load(None, ["data.corpus=['a', 'b']", "train.out_dir=x/y"])
    f = tmp_path / "r.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f).to_dict() == cfg.to_dict()


def test_describe_has_help_for_every_key():
    rows = config.describe()
    assert all(help_ for _, _, help_ in rows)
    assert {"backend", "parallel.dp", "train.out_dir", "train.steps", "train.seed"} <= {k for k, _, _ in rows}
