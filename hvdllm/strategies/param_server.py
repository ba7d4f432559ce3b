"""Parameter servers: extra ranks that hold the parameters and the AdamW state; the trainers
(workers) push gradients and pull parameters. Framework-free numpy over mpi/p2p: servers never
join a Horovod collective.

Sharding: server i of S owns the contiguous range FlatLayout.shard_range(S, i) of the flat
parameter vector (clipped to its real length), so shards differ in size by less than S values.
Server i keeps that range of the parameters and of AdamW's m and v (hvdllm/optim.FlatAdamW).

Messages. Each is a float64[8] header followed by the float32 payloads it announces, on one tag
per direction, so MPI's non-overtaking rule delivers a sender's messages in the order sent:

    worker -> server (PUSH_TAG)   HELLO [+ params shard (worker 0) + m, v shards (on resume)]
                                  PUSH + gradient shard  |  DONE  |  STATE  |  SHUTDOWN (worker 0)
    server -> worker (PULL_TAG)   REPLY + params shard  |  FINAL + params shard
                                  STATE + params, m, v shards
    server <-> server (NORM_TAG)  float64[1]: the squared norm of its averaged gradient shard (sync)

One training step of worker w (hvdllm/strategies/ps_worker.py), in order: compute the local
gradient (no communication); post the receive of every server's REPLY; send PUSH (header: its
step k, lr, loss, ||g_w||^2, the version of the shard it last pulled) and g_w[lo_i:hi_i] to every
server i; wait for every REPLY and load the parameters. Servers, by `ps.mode`:

    sync   collect the W pushes of step k; g = their mean; send ||g_i||^2 to the S-1 other servers
           and receive theirs; norm = sqrt(sum over servers, in server order, so every server gets
           the same); clip by that global norm exactly as single-process training does; AdamW;
           REPLY to every worker (parameters, norm, mean loss). Equals data parallelism.
    async  apply each push on arrival, clipped by that worker's own gradient norm (the gradient
           applied is that worker's alone), with a staleness-aware learning rate
           lr = schedule(global step = updates // W) / (1 + staleness), staleness = updates the
           shard took since the worker pulled it (Zhang et al. 2016, "Staleness-aware async-SGD").
           In steady state staleness ~ W - 1, so W pushes move the model about as far as one
           sync step does. Measured (hvdllm bench ps defaults: 2 workers, one 2x slower, equal
           tokens, val_loss above sync's; async runs are not deterministic): this rule async
           +2.0% to +6.6% (mean of 3 launches +4.3%), ssp +2.7%; full lr per push (ps.stale_lr =
           'constant') +8% / +21%; lr/sqrt(1+staleness) ('sqrt') +9% / +9%.
           REPLY to that worker at once.
    ssp    as async, but the REPLY to a worker that has completed c steps is held back until the
           slowest worker still training has completed at least c - ps.staleness steps: no
           worker starts a step more than `staleness` steps ahead of the slowest.

train.precision = 'fp16' (loss_scale.py): a worker unscales its gradient before the push; one
that overflowed pushes zeros with a non-finite squared norm in its header instead. Sync servers
then skip the round (no AdamW step, the reply's norm infinite, so every worker skips and halves
its scale alike, as data parallelism does); async/ssp servers skip that push only (its worker
alone halves its scale). A skipped round or push counts against the budget and the schedule as
an update does (a skipped step is a step), so AdamW's step count is the applied ones.

End of training. The step budget is the servers': sync stops after train.steps rounds; async and
ssp after train.steps * W applied pushes (the same tokens as sync, but a fast worker contributes
more of them than a straggler; pushes arriving after the budget are not applied). The REPLY that
spends the budget, and every later one, is flagged STOP; the worker then sends DONE and waits for
FINAL, which every server sends to all workers once all W are DONE, so all end with the same
parameters. Trainer rank 0 may then ask for STATE (checkpoints) and ends the servers with SHUTDOWN.

Log: each server writes `ps_server<i>.jsonl` in train.out_dir at exit, one record per push:
worker, step k, applied, gap (k minus the completed steps of the slowest active worker when the
push arrived: at most ps.staleness under ssp, 0 under sync) and staleness (updates this shard
received between the worker's pull and its push), lr (the applied one, async/ssp), t (AdamW steps
after it) and time (seconds).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from mpi import p2p

from ..errors import HvdllmError, InjectedFailure, PeerTimeout
from ..flat import FlatLayout
from ..lr import lr_at
from ..optim import FlatAdamW, clip_coef
from ..params import param_shapes

# headers: float64[HDR]; field positions below
HDR = 8
HELLO, PUSH, DONE, STATE, SHUTDOWN, REPLY, FINAL = 1, 2, 3, 4, 5, 6, 7
OP_NAMES = {HELLO: "HELLO", PUSH: "PUSH", DONE: "DONE", STATE: "STATE", SHUTDOWN: "SHUTDOWN",
            REPLY: "REPLY", FINAL: "FINAL"}
# worker -> server
OP, STEP, LR, LOSS, SQNORM, VERSION, HAS_PARAMS, HAS_STATE = range(HDR)
RESUME_T = LR            # HELLO reuses the lr slot for the resumed AdamW step count
# server -> worker (OP is field 0 as well)
T, NORM, MEAN_LOSS, FLAGS = 1, 2, 3, 4
STOP = 1

PUSH_TAG = p2p.tag("push", 0)
PULL_TAG = p2p.tag("pull", 0)
NORM_TAG = p2p.tag("push", 0, 1)



def stale_lr(lr: float, staleness: int, rule: str) -> float:
    """The learning rate of a push `staleness` updates stale (ps.stale_lr)."""
    if rule == "inverse":
        return lr / (1 + staleness)
    if rule == "sqrt":
        return lr / math.sqrt(1 + staleness)
    return lr


class ProtocolError(HvdllmError):
    """A message arrived that the parameter-server protocol does not allow here (a bug)."""


def flat_layout(model_cfg) -> FlatLayout:
    return FlatLayout(param_shapes(model_cfg))


def shard_ranges(flat: FlatLayout, servers: int) -> list[tuple[int, int]]:
    """[lo, hi) of every server's shard: FlatLayout's equal shards, clipped to the real length."""
    return [tuple(min(b, flat.total) for b in flat.shard_range(servers, i)) for i in range(servers)]


def header(op: int, fields: dict | None = None) -> np.ndarray:
    """A float64[HDR] header: `op`, then {field index: value}."""
    h = np.zeros(HDR, np.float64)
    h[OP] = op
    for i, value in (fields or {}).items():
        h[i] = value
    return h


class ParameterServer:
    """One server rank: its shard of parameters and AdamW state, and the event loop."""

    def __init__(self, cfg, layout, comm):
        self.cfg, self.comm, self.rank = cfg, comm, layout.rank
        self.workers = list(layout.role_ranks("trainer"))
        self.servers = list(layout.role_ranks("server"))
        self.index = self.servers.index(layout.rank)
        flat = flat_layout(cfg.model)
        self.lo, self.hi = shard_ranges(flat, len(self.servers))[self.index]
        n = self.hi - self.lo
        self.p = np.zeros(n, np.float32)
        self.opt = FlatAdamW(n, flat.decay_mask()[self.lo:self.hi], cfg.optim)
        self.mode, self.tau, self.W = cfg.ps.mode, cfg.ps.staleness, len(self.workers)
        self.per_step = 1 if self.mode == "sync" else self.W      # AdamW updates per global step
        self.budget = cfg.train.steps * self.per_step
        self.timeout = cfg.train.step_timeout
        # between two pushes a worker may also evaluate and checkpoint, each under its own deadline
        self.idle_s = 3 * self.timeout
        self.inbox = {w: np.empty(n, np.float32) for w in self.workers}
        self.mean = np.empty(n, np.float32)              # sync: the averaged gradient (reused)
        self.round: dict[int, np.ndarray] = {}          # sync: headers of this step's pushes
        self.clock = {w: 0 for w in self.workers}       # steps each worker has pushed
        self.held: set[int] = set()                     # async/ssp: replies not yet sent
        self.done: set[int] = set()
        self.outbox: list[p2p.Request] = []
        self.lent: list[tuple[list, np.ndarray]] = []   # reply buffers still being sent
        self.spare: list[np.ndarray] = []               # reply buffers free for reuse
        self.log: list[dict] = []
        self.t0 = None
        self.stopped = False
        # fp16: updates not made for an overflow (a push whose squared norm is not finite); they
        # count against the budget and the schedule as made ones do, as a skipped step does
        self.overflows = 0

    def _used(self) -> int:
        """Updates (async/ssp) or rounds (sync) of the budget used: AdamW's plus the overflows."""
        return self.opt.t + self.overflows

    # the event loop ----------------------------------------------------------------------
    def run(self) -> dict:
        self._hellos()
        box = p2p.Mailbox(self.comm, self.workers, PUSH_TAG)
        handlers = {PUSH: self._on_push, DONE: self._on_done, STATE: self._on_state,
                    SHUTDOWN: self._on_shutdown}
        while not self.stopped:
            try:
                w = box.next(self.idle_s)
            except PeerTimeout as e:
                raise PeerTimeout(f"parameter server {self.index} (rank {self.rank}): no message "
                                  f"from any worker. {e}") from None
            h = self._recv(w, np.empty(HDR, np.float64), "header")
            op = int(h[OP])
            if op not in handlers:
                raise ProtocolError(f"parameter server {self.index}: unexpected {OP_NAMES.get(op, op)} "
                                    f"from rank {w}")
            handlers[op](w, h)
            self.outbox = [r for r in self.outbox if not r.test()]
        p2p.waitall(self.outbox, self.timeout, f"parameter server {self.index}: last replies")
        self._write_log()
        return {"role": "server", "index": self.index, "updates": self.opt.t,
                "pushes": len(self.log), "shard": [self.lo, self.hi]}

    def _recv(self, src: int, buf: np.ndarray, what: str) -> np.ndarray:
        return p2p.recv_into(self.comm, buf, src, PUSH_TAG, self.timeout,
                             f"parameter server {self.index}: {what}")

    def _hellos(self) -> None:
        """Each worker's first message is HELLO (worker 0's carries the initial or resumed
        shard); trainer rank 0 may instead end a run that has no step left with SHUTDOWN."""
        waiting, have_params = list(self.workers), False
        while waiting and not self.stopped:
            # workers first prepare the corpus and build their model (trainer deadlines: 2x+1x)
            w = p2p.poll_any(self.comm, waiting, PUSH_TAG, 4 * self.timeout)
            h = self._recv(w, np.empty(HDR, np.float64), "HELLO")
            if int(h[OP]) == SHUTDOWN:
                self.stopped = True
                break
            if int(h[OP]) != HELLO:
                raise ProtocolError(f"parameter server {self.index}: expected HELLO from rank {w}, "
                                    f"got {OP_NAMES.get(int(h[OP]), h[OP])}")
            if h[HAS_PARAMS]:
                self._recv(w, self.p, "initial parameters")
                have_params = True
            if h[HAS_STATE]:
                self._recv(w, self.opt.m, "resumed AdamW m")
                self._recv(w, self.opt.v, "resumed AdamW v")
                self.opt.t = int(h[RESUME_T])
            waiting.remove(w)
        if not self.stopped and not have_params:
            raise ProtocolError(f"parameter server {self.index}: no worker sent the initial parameters")

    # pushes -------------------------------------------------------------------------------
    def _on_push(self, w: int, h: np.ndarray) -> None:
        self._recv(w, self.inbox[w], "gradient shard")
        if self.t0 is None:
            self.t0 = time.monotonic()
        k = int(h[STEP])
        if k != self.clock[w] or w in self.done:
            raise ProtocolError(f"parameter server {self.index}: rank {w} pushed step {k}, expected "
                                f"{self.clock[w]}{' (it had sent DONE)' if w in self.done else ''}")
        if self.mode == "sync":
            return self._collect(w, h)
        gap = k - self._slowest()
        applied = self._used() < self.budget
        rec = {"worker": w, "step": k, "applied": applied, "gap": gap,
               "staleness": self.opt.t - int(h[VERSION])}
        if applied and not math.isfinite(h[SQNORM]):   # fp16: the worker's gradient overflowed
            rec.update(applied=False, overflow=True)
            self.overflows += 1
        elif applied:  # staleness-aware: see the module docstring
            lr = lr_at(self._used() // self.per_step, self.cfg.optim, self.cfg.train.steps)
            rec["lr"] = stale_lr(lr, rec["staleness"], self.cfg.ps.stale_lr)
            self._update(self.inbox[w], math.sqrt(h[SQNORM]), rec["lr"])
        self.clock[w] = k + 1
        self._log(rec)
        self.held.add(w)
        self._release()

    def _collect(self, w: int, h: np.ndarray) -> None:
        """sync: keep the push; once all W are in, one averaged, globally clipped update."""
        self.round[w] = h
        self.clock[w] += 1
        if len(self.round) < self.W:
            return
        hs = [self.round[v] for v in self.workers]
        g = self.mean
        np.copyto(g, self.inbox[self.workers[0]])
        for v in self.workers[1:]:
            g += self.inbox[v]
        g /= np.float32(self.W)
        # fp16: any worker's overflow (every server sees every header) skips the round on every
        # server, with no norm exchange: the job-wide skip of data parallelism
        overflow = not all(math.isfinite(x[SQNORM]) for x in hs)
        norm = math.inf if overflow else math.sqrt(self._global_sq(float(np.dot(g, g))))
        recs = [{"worker": v, "step": int(x[STEP]), "applied": not overflow, "gap": 0,
                 "staleness": self.opt.t - int(x[VERSION])} for v, x in zip(self.workers, hs)]
        if overflow:
            self.overflows += 1
        else:
            self._update(g, norm, float(hs[0][LR]))
        for rec in recs:
            self._log(rec)
        mean_loss = sum(float(x[LOSS]) for x in hs) / self.W
        self.round.clear()
        self._reply(self.workers, REPLY, norm=norm, loss=mean_loss)

    def _global_sq(self, mine: float) -> float:
        """Sum of every server's squared shard norm, added in server order on every server."""
        if len(self.servers) == 1:
            return mine
        vals = {s: np.empty(1, np.float64) for s in self.servers if s != self.rank}
        out = np.array([mine], np.float64)
        reqs = [p2p.irecv(self.comm, buf, s, NORM_TAG) for s, buf in vals.items()]
        reqs += [p2p.isend(self.comm, out, s, NORM_TAG) for s in vals]
        p2p.waitall(reqs, self.timeout, f"parameter server {self.index}: gradient-norm exchange")
        return sum(mine if s == self.rank else float(vals[s][0]) for s in self.servers)

    def _update(self, g: np.ndarray, norm: float, lr: float) -> None:
        self._maybe_fail()
        coef = clip_coef(norm, self.cfg.optim.grad_clip)
        if coef != 1.0:   # in place: g is the inbox or self.mean, used by this update only
            g *= np.float32(coef)
        self.opt.step(self.p, g, lr)

    def _maybe_fail(self) -> None:
        t = self.cfg.train
        if self.rank == t.fail_rank and self.opt.t == t.fail_at_step:
            raise InjectedFailure(f"injected failure on parameter server {self.index} at update "
                                  f"{self.opt.t} (train.fail_at_step)")

    def _slowest(self) -> float:
        active = [self.clock[v] for v in self.workers if v not in self.done]
        return min(active) if active else math.inf

    def _release(self) -> None:
        """async: reply at once. ssp: reply to a worker only while it is at most tau steps ahead
        of the slowest active worker. After the budget: reply (STOP) to everyone held."""
        spent = self._used() >= self.budget
        lo = self._slowest()
        go = [w for w in sorted(self.held)
              if spent or self.mode == "async" or self.clock[w] - lo <= self.tau]
        if go:
            self.held.difference_update(go)
            self._reply(go, REPLY)

    # control ------------------------------------------------------------------------------
    def _on_done(self, w: int, h: np.ndarray) -> None:
        if w in self.done or w in self.held:
            raise ProtocolError(f"parameter server {self.index}: DONE from rank {w} out of turn")
        self.done.add(w)
        self._release()
        if len(self.done) == self.W:
            self._reply(self.workers, FINAL)

    def _on_state(self, w: int, h: np.ndarray) -> None:
        hdr = header(STATE, {T: self.opt.t})
        for buf in (hdr, self.p.copy(), self.opt.m.copy(), self.opt.v.copy()):
            self.outbox.append(p2p.isend(self.comm, buf, w, PULL_TAG))

    def _on_shutdown(self, w: int, h: np.ndarray) -> None:
        self.stopped = True

    def _reply(self, to: list[int], op: int, norm: float = 0.0, loss: float = 0.0) -> None:
        """Header and a copy of the shard (it changes before a send completes) to each of `to`."""
        hdr = header(op, {T: self.opt.t, NORM: norm, MEAN_LOSS: loss,
                          FLAGS: STOP if self._used() >= self.budget else 0})
        shard = self._shard_copy()
        sends = []
        for w in to:
            sends += [p2p.isend(self.comm, hdr, w, PULL_TAG), p2p.isend(self.comm, shard, w, PULL_TAG)]
        self.outbox += sends
        self.lent.append((sends, shard))

    def _shard_copy(self) -> np.ndarray:
        """A copy of the shard to send; buffers whose sends have completed are reused, since a
        fresh multi-MB array per reply costs page faults (see optim.FlatAdamW.step)."""
        busy = []
        for sends, buf in self.lent:
            if all(r.test() for r in sends):
                self.spare.append(buf)
            else:
                busy.append((sends, buf))
        self.lent = busy
        buf = self.spare.pop() if self.spare else np.empty_like(self.p)
        np.copyto(buf, self.p)
        return buf

    # log ------------------------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        rec.update(t=self.opt.t, time=round(time.monotonic() - self.t0, 6))
        self.log.append(rec)

    def _write_log(self) -> None:
        out = Path(self.cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"ps_server{self.index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log))


def serve(cfg, layout, comm) -> dict:
    """Run this server rank until trainer rank 0 sends SHUTDOWN."""
    return ParameterServer(cfg, layout, comm).run()
