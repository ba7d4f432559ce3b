"""The input pipeline: the next batches made on a background thread while the engine computes.

Prefetcher(make, steps, depth, timeout_s, prepare) calls make(step) (and prepare on its result:
the torch backend pins it on CUDA so the engine's host-to-device copy can be non-blocking) for
each step in order, at most `depth` batches ahead (a bounded queue), and get(step) hands them
out in that order. Every get has a deadline; an exception in the producer is raised again by
the get that would have returned its batch (never a hang, never a silent stop); close() (also on
leaving the `with` block, normally or by an error) stops the thread and waits for it, within a
deadline too. depth = 0 makes each batch in get itself: no thread.

A thread and not a process: the batch is a gather of token windows in numpy, which releases the
GIL, and a process would have to copy every batch across.
"""
from __future__ import annotations

import queue
import threading

from .errors import HvdllmError

_END = object()
_POLL_S = 0.05   # how often a blocked producer checks for close()


class _Failed:
    def __init__(self, step, error):
        self.step, self.error = step, error


def _failed(step, error) -> HvdllmError:
    return HvdllmError(f"input pipeline: making the batch of step {step} failed: {type(error).__name__}: {error}")


class Prefetcher:
    def __init__(self, make, steps, depth: int, timeout_s: float, prepare=None):
        self.make, self.prepare = make, prepare
        self.steps, self.depth, self.timeout_s = iter(steps), depth, timeout_s
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="hvdllm-prefetch", daemon=True)
            self._thread.start()

    def _one(self, step):
        batch = self.make(step)
        return batch if self.prepare is None else self.prepare(*batch)

    def _put(self, item) -> bool:
        """Into the queue unless close() comes first (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        for step in self.steps:
            try:
                item = (step, self._one(step))
            except BaseException as e:   # handed to the trainer, which raises it
                self._put(_Failed(step, e))
                return
            if not self._put(item):
                return
        self._put(_END)

    def get(self, step: int):
        """The batch of `step`, which must be the next one in the order given."""
        if self._thread is None:
            expected = next(self.steps, None)
            if expected != step:
                raise HvdllmError(f"input pipeline: batch of step {step} asked for, {expected} is next")
            try:
                return self._one(step)
            except Exception as e:
                raise _failed(step, e) from e
        try:
            item = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise HvdllmError(f"input pipeline: no batch for step {step} within {self.timeout_s:g} s "
                              f"(train.step_timeout); the data source is stuck or far too slow") from None
        if isinstance(item, _Failed):
            raise _failed(item.step, item.error) from item.error
        if item is _END or item[0] != step:
            got = "the end of the steps" if item is _END else f"step {item[0]}'s"
            raise HvdllmError(f"input pipeline: batch of step {step} asked for, {got} came")
        return item[1]

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(1.0, self.timeout_s))
        if self._thread.is_alive():   # make() itself is stuck; the thread is a daemon
            raise HvdllmError(f"input pipeline: the batch thread did not stop within "
                              f"{max(1.0, self.timeout_s):g} s of the end of the run")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except HvdllmError:
            if exc[0] is None:   # on an error, that error is the one to report
                raise
