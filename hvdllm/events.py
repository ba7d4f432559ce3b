"""TensorBoard event files of a run's scalars (train.tensorboard): rank 0 writes every metrics
record under out_dir/tensorboard/ with the tensorboard package's own writer and protos, so a
torch run needs no TensorFlow. `tensorboard --logdir runs/` shows them."""
from __future__ import annotations

import time
from pathlib import Path


def available() -> bool:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        return False
    return True


class EventWriter:
    def __init__(self, folder):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event, self._summary = Event, Summary
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._w = EventFileWriter(str(folder))

    def write(self, record: dict) -> None:
        """A record's numbers (not its step, role or text) as scalars at its step."""
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            self._w.add_event(self._event(wall_time=time.time(), step=int(record.get("step", 0)),
                                          summary=self._summary(value=values)))
            self._w.flush()

    def close(self) -> None:
        self._w.close()
