"""Stop early with a checkpoint when the job is told its time is up (never lose work).

Slurm sends a signal before the time limit (`#SBATCH --signal=USR1@120`; `hvdllm launch
--launcher sbatch --time ...` writes that line) or on preemption (`scancel --signal=USR1`).
On train.stop_signal every rank only sets a flag. The trainer ranks then agree, at a step
boundary, to stop at the same step: one tiny allreduce of the flags every n steps, n fixed once
for the whole job from the first steps' time so that a check comes about every
train.stop_check_s seconds (a per-step message would cost tiny models ~15% of their step).
At the agreed step they write a checkpoint, end as at the end of training (roles get the final
weights, the final barrier) and exit with code 75 (EX_TEMPFAIL: "try again"), so a job script
can requeue itself; `--set train.resume=true` continues from that step.

SIGTERM and SIGINT keep their meaning (another rank failed, or the job was cancelled: end now).
"""
from __future__ import annotations

import math
import signal
import sys

import numpy as np

EXIT_STOPPED = 75
_received: list[int] = []


def install(name: str, rank: int, honoured: bool) -> None:
    """Catch SIG<name> on this rank ('none': leave it alone). Ranks that cannot stop early
    (parameter-server runs) say so and carry on instead of dying of the default action."""
    if name == "none":
        return

    def on_signal(signum, frame):
        if honoured:
            _received.append(signum)
        else:
            sys.stderr.write(f"[hvdllm] rank {rank}: SIG{name} ignored: parameter-server runs stop only "
                             f"at train.steps (or when the job is killed)\n")
    try:
        signal.signal(getattr(signal, f"SIG{name}"), on_signal)
    except ValueError:   # not the main thread (a test runner): nothing to catch
        pass


def received() -> bool:
    return bool(_received)


class Agreement:
    """Every trainer rank calls due(...) after each step, in the same order; all get the same
    answer at the same step. `coll` is NumpyCollectives over the trainer ranks."""

    def __init__(self, coll, check_s: float, first_step: int):
        self.coll, self.check_s, self.first = coll, check_s, first_step
        self.every: int | None = None

    def due(self, done: int, step_s: float) -> bool:
        k = done - self.first
        if self.every is None:
            if k < 2:   # the first step traces / warms up: time the second
                return False
            # one collective: the mean step time (fixes n everywhere alike) and the flags
            s = self.coll.allreduce(np.array([step_s, float(received())]), op="sum", name="stop.init")
            self.every = max(1, min(1000, math.ceil(self.check_s / max(s[0] / self.coll.size, 1e-6))))
            return bool(s[1] > 0)
        if k % self.every:
            return False
        return bool(self.coll.allreduce(np.array([float(received())]), op="sum", name="stop.check")[0] > 0)
