"""train.tensorboard: metrics records become TensorBoard scalars that TensorBoard's own reader
reads back (the tensorboard package, no TensorFlow)."""
import pytest

from hvdllm import config, metrics


def test_records_read_back_as_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = metrics.MetricsLog(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 5.0 - step, "mfu": 0.25, "role": "trainer", "final": True})
    log.write({"step": 3, "val_loss": 1.5})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "mfu", "val_loss"]   # no text, no booleans
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == [(3, 1.5)]
    assert len(metrics.read(tmp_path / "metrics.jsonl")) == 4   # metrics.jsonl as before


def test_without_the_package_the_key_is_named(monkeypatch):
    from hvdllm import events
    monkeypatch.setattr(events, "available", lambda: False)
    with pytest.raises(config.ConfigError, match="train.tensorboard: needs the tensorboard package"):
        config.validate(config.load(None, ["train.tensorboard=true"]))
