import numpy as np
import pytest

from hvdllm import checkpoint, lr
from hvdllm.config import OptimConfig
from hvdllm.errors import CheckpointError


def test_atomic_save_load_prune(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "optim.step": np.array(3)}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, state, {"x": 1}, keep=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    got, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 3 and meta["x"] == 1
    np.testing.assert_array_equal(got["a"], state["a"])
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_half_written_file_is_ignored_and_corrupt_file_named(tmp_path):
    checkpoint.save(tmp_path, 5, {"a": np.zeros(2)}, {})
    (tmp_path / "checkpoints" / ".step_00000006.npz.tmp-1").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "step_00000005.npz"
    bad = tmp_path / "checkpoints" / "step_00000007.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_00000007"):
        checkpoint.load(bad)


def test_shape_check():
    with pytest.raises(CheckpointError, match="w: shape"):
        checkpoint.check_compatible({"w": np.zeros((2, 2))}, {"w": (2, 3)}, "p")


def test_lr_schedule():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr.lr_at(0, o, 100) == pytest.approx(0.1)
    assert lr.lr_at(9, o, 100) == pytest.approx(1.0)
    assert lr.lr_at(100, o, 100) == pytest.approx(0.1)
    assert 0.1 < lr.lr_at(55, o, 100) < 1.0
