"""The worker side of parameter servers: an Engine (hvdllm/engine.py) over a backend's Engine.

A step is the backend's `local_gradients` (no communication), then the push/pull exchange with
every server described in hvdllm/strategies/param_server.py, then `set_flat_params`. The
backend's own optimizer and gradient allreduce are never used; nothing here imports a framework,
so torch and TensorFlow workers are the same code.

Clipping equals single-process training in sync mode: the servers clip the averaged gradient by
its global norm, which they get by adding the squared norms of their shards (one float from each
server to each other server). In async/ssp a push is one worker's gradient and is clipped by that
gradient's own norm, which the worker computes (it holds the whole gradient) and sends along.

What a step returns: sync, the mean loss of all workers and the global gradient norm (as data
parallelism reports them); async/ssp, this worker's own loss and gradient norm. `final` is true on
the step after which the servers' budget is spent (see param_server.py): with async/ssp a fast
worker runs more steps than a straggler, so the training loop ends on `final`, not on a count.
In async/ssp the `lr` and `tokens_per_s` that trainer rank 0 logs are its own step's view; the
servers apply the schedule at the global step (param_server.py) and log every push with its time.
"""
from __future__ import annotations

import math

import numpy as np

from mpi import p2p

from ..engine import StepResult
from ..engines import EngineBase
from . import param_server as ps
from .param_server import HDR, PULL_TAG, PUSH_TAG, ProtocolError


class PSStepResult(StepResult):
    def __init__(self, loss, grad_norm, final: bool = False, skipped: bool = False):
        super().__init__(loss, grad_norm, skipped)
        self.final = final   # the servers' step budget is spent: this worker's training is over


class PSWorker(EngineBase):
    def __init__(self, engine, cfg, layout, rt):
        rt.require_mpi("parameter servers (ps.servers > 0)")
        self.inner, self.cfg, self.layout, self.comm = engine, cfg, layout, rt.comm
        self.servers = list(layout.role_ranks("server"))
        self.flat = ps.flat_layout(cfg.model)
        self.ranges = ps.shard_ranges(self.flat, len(self.servers))
        self.timeout = cfg.train.step_timeout
        # Read by the trainer: sync steps in lockstep; async/ssp workers run until `final`.
        self.lockstep = cfg.ps.mode == "sync"
        self.max_steps = cfg.train.steps * (1 if self.lockstep else layout.n_trainers)
        self.params = np.ascontiguousarray(engine.flat_params(), np.float32)
        self.versions = [0] * len(self.servers)
        self.pushes, self.started, self.finished = 0, False, False
        self.resume = None  # (m, v, t) to hand to the servers in HELLO (trainer rank 0)
        self.slow = cfg.ps.straggler_factor if layout.rank == cfg.ps.straggler_rank else 1.0
        self.extra_passes = 0.0

    # fp16's scaler and the testing aid's overflow are the backend engine's (it scales the loss);
    # the trainer reaches them here (logs, checkpoints, train.fail_mode = 'overflow')
    @property
    def scaler(self):
        return self.inner.scaler

    @property
    def inject_overflow(self) -> bool:
        return self.inner.inject_overflow

    @inject_overflow.setter
    def inject_overflow(self, on: bool) -> None:
        self.inner.inject_overflow = on

    # the Engine contract ----------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PSStepResult:
        if self.finished:
            raise ProtocolError("train_step after the parameter servers' budget was spent")
        self._hello()
        loss, g = self.inner.local_gradients(x, y)
        g = np.ascontiguousarray(g, np.float32)
        scaler = self.scaler   # fp16: g is this step's loss scale (inner.scale) times the gradient
        overflow = scaler is not None and not np.isfinite(g).all()
        if scaler is not None:   # the servers get the true gradient, or zeros and an infinite norm
            g = np.zeros_like(g) if overflow else g / np.float32(self.inner.scale)
        # ps.straggler_*: a slower machine, f times the work per step: it computes the same
        # gradient again f - 1 times (a fraction carried to later steps) rather than sleeping: a
        # sleeping straggler frees its core for the others on an oversubscribed host and flatters
        # async, and counting passes, not seconds, keeps it f times slower whatever else loads
        # the machine. Not on the first step: that one traces/compiles (TF: seconds).
        if self.slow > 1.0 and self.pushes > 0:
            self.extra_passes += self.slow - 1.0
            if self.extra_passes >= 1.0:
                g = g.copy()   # the extra passes may reuse its memory
            while self.extra_passes >= 1.0:
                self.inner.local_gradients(x, y)
                self.extra_passes -= 1.0
        # float32 like the backends' norms; used by async/ssp clipping (fp16: inf flags an overflow)
        sq = math.inf if overflow else float(np.dot(g, g))
        k = self.pushes
        reqs, hdrs = self._post_replies()
        for i, (s, (lo, hi)) in enumerate(zip(self.servers, self.ranges)):
            h = ps.header(ps.PUSH, {ps.STEP: k, ps.LR: lr, ps.LOSS: loss, ps.SQNORM: sq,
                                    ps.VERSION: self.versions[i]})
            reqs += [p2p.isend(self.comm, h, s, PUSH_TAG), p2p.isend(self.comm, g[lo:hi], s, PUSH_TAG)]
        p2p.waitall(reqs, self.timeout, f"worker rank {self.layout.rank}: push/pull of step {k} "
                                        f"with parameter servers {self.servers}")
        self._check(hdrs, ps.REPLY)
        self.pushes += 1
        self.versions = [int(h[ps.T]) for h in hdrs]
        if self.lockstep:
            loss, norm = float(hdrs[0][ps.MEAN_LOSS]), float(hdrs[0][ps.NORM])
        else:
            norm = sq ** 0.5
        final = any(int(h[ps.FLAGS]) & ps.STOP for h in hdrs)
        if final:
            self._finish()
        self.inner.set_flat_params(self.params)
        # fp16: sync, the round's (every worker alike); async/ssp, this push's own
        skipped = scaler is not None and not math.isfinite(norm)
        if scaler is not None:
            scaler.update(not skipped)
        return PSStepResult(loss=float(loss), grad_norm=norm, final=final, skipped=skipped)

    def evaluate(self, x, y):
        return self.inner.evaluate(x, y)

    def allreduce_sum(self, values):
        return self.inner.allreduce_sum(values)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def flat_params(self) -> np.ndarray:
        return self.params.copy()

    def num_params(self) -> int:
        return self.flat.total

    def state_dict(self) -> dict[str, np.ndarray]:
        """Trainer rank 0 (the one that writes checkpoints) fetches parameters and AdamW state
        from the servers; other workers return their parameters (the trainer drops them)."""
        if self.layout.rank != 0:
            return {n: a.copy() for n, a in self.flat.unflatten(self.params).items()}
        self._hello()
        full = [np.empty(self.flat.total, np.float32) for _ in range(3)]   # params, m, v
        hdrs = [np.empty(HDR, np.float64) for _ in self.servers]
        reqs = []
        for s, h, (lo, hi) in zip(self.servers, hdrs, self.ranges):
            reqs += [p2p.irecv(self.comm, h, s, PULL_TAG)]
            reqs += [p2p.irecv(self.comm, a[lo:hi], s, PULL_TAG) for a in full]
        reqs += [p2p.isend(self.comm, ps.header(ps.STATE), s, PUSH_TAG) for s in self.servers]
        p2p.waitall(reqs, self.timeout, "checkpoint: state from the parameter servers")
        self._check(hdrs, ps.STATE)
        out = {n: a.copy() for n, a in self.flat.unflatten(full[0]).items()}
        for key, a in (("m", full[1]), ("v", full[2])):
            out.update({f"optim.{key}.{n}": b.copy() for n, b in self.flat.unflatten(a).items()})
        # async servers may differ by a few updates; sync ones agree
        out["optim.step"] = np.array(min(int(h[ps.T]) for h in hdrs), np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.started:
            raise ProtocolError("load_state_dict after the parameter servers were started")
        self.inner.load_state_dict(state)
        self.params = np.ascontiguousarray(self.inner.flat_params(), np.float32)
        first = f"optim.m.{self.flat.names[0]}"
        if self.layout.rank == 0 and first in state and int(state.get("optim.step", 0)) > 0:
            m = self.flat.flatten({n: state[f"optim.m.{n}"] for n in self.flat.names})
            v = self.flat.flatten({n: state[f"optim.v.{n}"] for n in self.flat.names})
            self.resume = (m, v, int(state["optim.step"]))

    def shard_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Trainer rank 0 writes the whole state it fetched from the servers (one file)."""
        return self.state_dict(), {}

    @property
    def param_shapes(self) -> dict[str, tuple]:
        return self.inner.param_shapes

    def full_params(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.flat.unflatten(self.params).items()}

    def close(self) -> None:
        """End of training: trainer rank 0 (after its last checkpoint) ends the servers."""
        if self.layout.rank != 0:
            return
        reqs = [p2p.isend(self.comm, ps.header(ps.SHUTDOWN), s, PUSH_TAG) for s in self.servers]
        p2p.waitall(reqs, self.timeout, "SHUTDOWN to the parameter servers")

    # protocol ---------------------------------------------------------------------------------
    def _hello(self) -> None:
        """First contact, lazily (after any resume): worker 0 hands over the parameters."""
        if self.started:
            return
        self.started = True
        first = self.layout.rank == 0
        reqs = []
        for s, (lo, hi) in zip(self.servers, self.ranges):
            h = ps.header(ps.HELLO, {ps.HAS_PARAMS: first, ps.HAS_STATE: first and self.resume is not None,
                                     ps.RESUME_T: self.resume[2] if first and self.resume else 0})
            bufs = [h] + ([self.params[lo:hi]] if first else [])
            if first and self.resume is not None:
                bufs += [self.resume[0][lo:hi], self.resume[1][lo:hi]]
            reqs += [p2p.isend(self.comm, b, s, PUSH_TAG) for b in bufs]
        p2p.waitall(reqs, self.timeout, f"worker rank {self.layout.rank}: HELLO to the parameter servers")

    def _post_replies(self) -> tuple[list, list]:
        """Receives of every server's header and shard, straight into self.params."""
        hdrs = [np.empty(HDR, np.float64) for _ in self.servers]
        reqs = []
        for s, h, (lo, hi) in zip(self.servers, hdrs, self.ranges):
            reqs += [p2p.irecv(self.comm, h, s, PULL_TAG), p2p.irecv(self.comm, self.params[lo:hi], s, PULL_TAG)]
        return reqs, hdrs

    def _finish(self) -> None:
        """DONE to every server; FINAL (the same parameters for all workers) once all are done."""
        reqs, hdrs = self._post_replies()
        reqs += [p2p.isend(self.comm, ps.header(ps.DONE), s, PUSH_TAG) for s in self.servers]
        p2p.waitall(reqs, self.timeout, f"worker rank {self.layout.rank}: waiting for the other "
                                        f"workers to finish (FINAL from the parameter servers)")
        self._check(hdrs, ps.FINAL)
        self.finished = True

    def _check(self, hdrs, op: int) -> None:
        for s, h in zip(self.servers, hdrs):
            if int(h[ps.OP]) != op:
                raise ProtocolError(f"worker rank {self.layout.rank}: expected {ps.OP_NAMES[op]} from "
                                    f"server rank {s}, got {ps.OP_NAMES.get(int(h[ps.OP]), h[ps.OP])}")
