"""Pipeline parallelism: run this stage's instruction list (schedules.py) for one optimizer step.

The model's layers are split into p*v contiguous chunks (partition.py); virtual stage
vs = chunk*p + stage lives on pipeline rank vs % p. Messages, all over the pipeline
sub-communicator with mpi/p2p (numpy buffers, shape header first, tags = (kind, mb, chunk)):
  - act:  forward output of vs -> vs+1 (non-blocking send, blocking receive with a deadline);
  - grad: gradient of vs+1's input -> vs (same);
  - after the last backward: every posted send is waited for (deadline), then the backend's
    reduce (tied-embedding sum between the first and last stage, dp allreduce, global clip
    norm over the pipeline) and the optimizer step;
  - the loss, known on the last stage, is broadcast over the pipeline.
Sends are posted non-blocking because the interleaved schedule deadlocks with blocking sends
(schedules.simulate shows it); the buffered simulation is deadlock-free for every schedule.
"""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from mpi import p2p

from . import schedules


class StageRunner(Protocol):
    """What a backend supplies for one pipeline rank (it holds this rank's chunks)."""

    def forward(self, chunk: int, mb: int, inp: np.ndarray, target: np.ndarray | None) -> np.ndarray | float:
        """Run chunk's layers; return the activation, or (last virtual stage) the mb's loss (a
        float, or a 0-d tensor left unread until the step's end)."""

    def backward(self, chunk: int, mb: int, grad: np.ndarray | None) -> np.ndarray | None:
        """Backward of a saved forward; return d(input) (None on the first virtual stage)."""


class Pipeline:
    def __init__(self, comm, p: int, stage: int, m: int, v: int, schedule: str, timeout_s: float):
        self.comm, self.p, self.stage, self.m, self.v = comm, p, stage, m, v
        self.timeout = timeout_s
        self.alloc = np.empty   # received activations' arrays; a GPU engine pins them (p2p.recv_array)
        self.last_vs = p * v - 1
        self.instrs = schedules.build(schedule, p, m, stage, v)
        self.trace = None  # set to a list to record (start, end, op, mb, chunk) per instruction
        schedules.validate_schedule([schedules.build(schedule, p, m, s, v) for s in range(p)], p, m, v)

    def owner(self, vs: int) -> int:
        return vs % self.p

    def run(self, runner: StageRunner, xs: list, ys: list, reduce_and_step) -> float:
        """One optimizer step over m micro-batches; returns the mean loss (on every stage)."""
        inbox, outbox, sends, loss = {}, {}, [], 0.0
        for ins in self.instrs:
            t0 = time.perf_counter() if self.trace is not None else 0.0
            vs = ins.chunk * self.p + self.stage
            key = (ins.mb, ins.chunk)
            if ins.op == "recv_act":
                inbox[key] = p2p.recv_array(self.comm, self.owner(vs - 1), "act", ins.mb, self.timeout, ins.chunk,
                                            self.alloc)
            elif ins.op == "forward":
                inp = xs[ins.mb] if vs == 0 else inbox.pop(key)
                out = runner.forward(ins.chunk, ins.mb, inp, ys[ins.mb] if vs == self.last_vs else None)
                if vs == self.last_vs:   # a float, or a 0-d tensor read once at the end (no sync here)
                    loss = loss + out / self.m
                else:
                    outbox[key] = out
            elif ins.op == "send_act":
                sends += p2p.isend_array(self.comm, outbox.pop(key), self.owner(vs + 1), "act", ins.mb,
                                         (vs + 1) // self.p)
            elif ins.op == "recv_grad":
                inbox[("g",) + key] = p2p.recv_array(self.comm, self.owner(vs + 1), "grad", ins.mb,
                                                     self.timeout, ins.chunk, self.alloc)
            elif ins.op == "backward":
                g = runner.backward(ins.chunk, ins.mb, None if vs == self.last_vs else inbox.pop(("g",) + key))
                if vs > 0:
                    outbox[("g",) + key] = g
            elif ins.op == "send_grad":
                sends += p2p.isend_array(self.comm, outbox.pop(("g",) + key), self.owner(vs - 1), "grad",
                                         ins.mb, (vs - 1) // self.p)
            elif ins.op == "reduce_grads":
                p2p.waitall(sends, self.timeout, f"pipeline stage {self.stage}: outstanding sends")
                sends = []
            elif ins.op == "step":
                reduce_and_step()
            else:
                raise AssertionError(f"unknown instruction {ins}")
            if sends:  # release finished sends now: their buffers would otherwise live to the step's end
                sends = [r for r in sends if not r.test()]
            if self.trace is not None:
                self.trace.append((t0, time.perf_counter(), ins.op, ins.mb, ins.chunk))
        return self.broadcast_loss(loss)

    def broadcast_loss(self, loss: float) -> float:
        """The last stage knows the loss; every stage reports it."""
        buf = np.array([float(loss)], np.float64)
        self.comm.Bcast(buf, root=self.owner(self.last_vs))
        return float(buf[0])

    def forward_only(self, forward, x: np.ndarray) -> object:
        """Evaluation: one pass through every virtual stage, blocking, in order. Returns the last
        virtual stage's result on its owner and None elsewhere."""
        act = x
        for vs in range(self.p * self.v):
            if self.owner(vs) != self.stage:
                continue
            chunk = vs // self.p
            if vs > 0 and self.p > 1:
                act = p2p.recv_array(self.comm, self.owner(vs - 1), "eval", 0, self.timeout, chunk)
            act = forward(chunk, act)
            if vs < self.last_vs and self.p > 1:
                p2p.send_array(self.comm, act, self.owner(vs + 1), "eval", 0, self.timeout, (vs + 1) // self.p)
        return act if self.owner(self.last_vs) == self.stage else None


# ---------------------------------------------------------------------------------------------
# Framework-free pieces both backends' pipeline engines use.

def stage_chunks(ranges: list[tuple[int, int]], p: int, v: int, stage: int) -> list[list[int]]:
    """Layer indices of this rank's v chunks (virtual stage vs = chunk*p + stage)."""
    return [list(range(*ranges[c * p + stage])) for c in range(v)]


def tied_peer(p: int, layers, n_layer: int) -> int | None:
    """The pipeline rank holding the other copy of the tied embedding `wte` (None if this rank
    holds neither end, or both)."""
    first, head = 0 in layers, n_layer + 1 in layers
    if p == 1 or first == head:
        return None
    return p - 1 if first else 0


def sum_with_peer(comm, peer: int, array: np.ndarray, timeout_s: float) -> np.ndarray:
    """Exchange an array with one peer and return the sum (the tied-embedding gradient)."""
    mine = np.ascontiguousarray(array, dtype=np.float32)
    theirs = np.empty_like(mine)
    t = p2p.tag("params", 0, 1)
    reqs = [p2p.isend(comm, mine, peer, t), p2p.irecv(comm, theirs, peer, t)]
    p2p.waitall(reqs, timeout_s, "tied-embedding gradient exchange")
    return mine + theirs


def allreduce_sum(comm, value: float, timeout_s: float, what: str) -> float:
    """A float summed over the pipeline communicator, with a deadline."""
    from mpi4py import MPI
    send, recv = np.array([value], np.float64), np.empty(1)
    p2p.wait(comm.Iallreduce(send, recv, op=MPI.SUM), timeout_s, what)
    return float(recv[0])


def make_zero(cfg, engine):
    """ZeRO-1 for a pipeline stage (both backends): the stage's (tp slices of its) parameters
    sharded over its dp group. Sets engine.flat. The clipping norm counts the tied `wte` once
    (on the first stage), sums tp slices over the tp group and the stages over the pipeline,
    as the unsharded step does. The stage's tensor Collectives (dp, tp) move the backend's own
    tensors (zero.py)."""
    from ..flat import FlatLayout
    from . import tensor_parallel as tp_plan
    from .zero import Zero1
    engine.flat = FlatLayout({n: tuple(p.shape) for n, p in engine.named})

    def kind(n):
        if n == "wte" and engine.tied_peer == 0:
            return "skip"
        return tp_plan.norm_kind(n) if engine.tp else "sharded"
    return Zero1(engine.flat, engine.comm, cfg.optim, cfg.aggregation,
                 tp=engine.tp.coll if engine.tp else None, kind=kind,
                 pp_sum=lambda x: allreduce_sum(engine.pp_comm, x, engine.timeout, "pipeline grad-norm allreduce"))


def gather_to_first(comm, stage: int, p: int, local: dict, timeout_s: float) -> dict:
    """Every stage's arrays to pipeline rank 0 (a checkpoint is the whole model); other ranks
    get their own back."""
    t = p2p.tag("ckpt", 0)
    if stage != 0:
        p2p.send_obj(comm, local, 0, t, timeout_s, "checkpoint gather")
        return local
    full = dict(local)
    for src in range(1, p):
        part = p2p.recv_obj(comm, src, t, timeout_s, "checkpoint gather")
        full.update({k: v for k, v in part.items() if k != "optim.step"})
    return full


def bcast_from_last(pipe: Pipeline, values: np.ndarray) -> np.ndarray:
    """Evaluation results live on the last virtual stage's owner; every stage reports them."""
    buf = np.ascontiguousarray(values, dtype=np.float64)
    pipe.comm.Bcast(buf, root=pipe.owner(pipe.last_vs))
    return buf


def split_layers(cfg, rt, parts: int, measure) -> list[tuple[int, int]]:
    """parallel.partition over the GPT's layers. 'time' measures each layer once on world rank 0
    with the backend's `measure(model_cfg, seed, batch)` and broadcasts, so every rank splits the
    same way."""
    from ..params import layer_costs
    from ..task import model_config
    from .partition import partition
    m, method = cfg.model, cfg.parallel.partition
    costs = layer_costs(model_config(cfg))   # a classifier's last layer: its head, not the vocabulary's
    if method == "time":
        # every rank of COMM_WORLD, role ranks too (strategies/roles.join_trainer_startup)
        costs = rt.comm.bcast(measure(m, cfg.train.seed, 2) if rt.rank == 0 else None, root=0)
    return partition(costs, parts, method)
