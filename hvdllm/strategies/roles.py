"""Task separation: ranks beside the trainers that evaluate and sample from weight snapshots, and
the dispatch of every role rank (parameter servers: param_server.py).

Snapshots leave from trainer rank 0, beside any training strategy. With parallel.pp = tp = 1
(data parallel, ZeRO-1, local SGD, parameter servers) rank 0 holds the whole model and the other
trainers take no part. Under pipeline or tensor parallelism no rank holds it: on a snapshot step
rank 0 broadcasts its decision (is any role idle?) to every trainer, one int32 over the trainers'
Horovod process set, under the step deadline; when some role is idle, the ranks of data-parallel
replica 0 gather the parameters (`engine.full_params()`: tp slices by allgather, then pipeline
stages to pipeline rank 0 = world rank 0), and rank 0 flattens them in the canonical order of
params.param_shapes, the order a role's own pp = tp = 1 engine loads. A role rank joins the MPI
collectives the trainers' pipeline engines make over all ranks at start-up
(`join_trainer_startup`). Under ZeRO-3 (parallel.zero = 3) every trainer holds a shard of every
unit: all trainers share the decision and join one allgather per unit (`engine.unit_params()`),
and rank 0 writes each unit into the flat snapshot as it arrives, so no trainer holds more of
the model on its device than one unit. Trainers never wait for a role:

    role r -> rank 0   READY   a small pickled {"record": <result of the last snapshot> | None}:
                               "idle, send the next snapshot"; the record goes to metrics.jsonl
    rank 0 -> role r   header float64[4] (SNAPSHOT, step, n) + the flat float32 parameters
                       header (SHUTDOWN) at the end

All on tag("eval", 0) for evaluators and tag("gen", 0) for generators. After each step divisible
by roles.snapshot_every, rank 0 looks (Iprobe, no wait) for READY from each role; it sends a
snapshot (non-blocking, from a copy, so training goes on while it travels) to those that are
ready and skips the busy ones, like TF's sidecar evaluator (under pp / tp the trainers then
spend one broadcast, plus one gather when a role is idle; never a wait for a role). At the end of
training (under pp / tp after one last gather of the final weights) rank 0 waits for each role
once more, sends it the final weights if it has not evaluated them yet, collects its last record
and sends SHUTDOWN: the final model is always evaluated.

metrics.jsonl keeps one writer: the role's records travel with READY and rank 0 writes them
(`{"step", "role": "evaluator", "rank", "val_loss", "val_ppl", "val_acc", "eval_time_s"}`, or
`{"step", "role": "generator", "rank", "samples", "gen_time_s"}`; a classify run's evaluator,
hvdllm/finetune.py's ClassifyEvaluator, records the classifier's metrics), plus one closing record
`{"step", "role": "publisher", "snapshots_sent", "snapshots_skipped", "offer_s_total",
"offer_s_max"}` (the time rank 0 spent offering snapshots: all that roles cost a trainer step).

Evaluators and generators lower their CPU priority by roles.nice, so that on a node they share
with trainers the trainers keep their pace (a starved evaluator skips more snapshots).

An evaluator evaluates the same validation windows the trainers' own evaluation does
(train.eval_batches global batches of dp x train.batch_size windows), so its val_loss equals the
trainers' at the same step. A generator writes `samples/step_<step>_rank<r>.txt` in
train.out_dir: a continuation of each line of roles.prompts_file (or train.sample_prompt).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from mpi import p2p

from .. import config, data, runtime, task
from ..errors import PeerTimeout
from ..layout import Layout
from . import param_server

SNAPSHOT, SHUTDOWN = 1, 2
TAGS = {"evaluator": p2p.tag("eval", 0), "generator": p2p.tag("gen", 0)}


def has_roles(layout: Layout) -> bool:
    return bool(layout.evaluators or layout.generators)


def publisher(cfg, layout: Layout, rt, backend, watchdog, write):
    """This trainer rank's SnapshotPublisher, or None when it has no part in snapshots: no role
    ranks, or a rank other than 0 while rank 0 holds the whole model (parallel.pp = tp = 1).
    `write` (rank 0's metrics log) may be None on other ranks."""
    if not has_roles(layout) or (layout.rank != 0 and not gathered(layout, cfg)):
        return None
    return SnapshotPublisher(cfg, layout, rt, write, backend, watchdog)


def gathered(layout: Layout, cfg) -> bool:
    """Whether a snapshot must be gathered from several trainer ranks (pipeline stages,
    tensor-parallel slices or ZeRO-3's shards) instead of read from rank 0 alone."""
    return layout.pp > 1 or layout.tp > 1 or zero3(cfg)


def zero3(cfg) -> bool:
    """ZeRO-3: every dp rank holds a shard of every unit, so all trainers gather a snapshot."""
    return cfg.parallel.zero == 3


class SnapshotPublisher:
    """The trainers' side: rank 0 offers snapshots and collects records (written with `write`);
    under pipeline / tensor parallelism every trainer rank has one, to help gather the weights,
    and `backend` (its Collectives) and `watchdog` (the deadline on that) are required."""

    def __init__(self, cfg, layout: Layout, rt, write, backend=None, watchdog=None):
        rt.require_mpi("task separation (roles.evaluators / roles.generators)")
        self.comm, self.write, self.watchdog, self.layout = rt.comm, write, watchdog, layout
        self.root = layout.rank == 0
        self.every, self.timeout = cfg.roles.snapshot_every, cfg.train.step_timeout
        self.flat_layout = param_server.flat_layout(task.model_config(cfg))   # a classifier's head too
        # pp/tp: rank 0's decision (is any role idle?) goes to every trainer over their process set
        self.coll = None
        self.by_unit = zero3(cfg)
        if gathered(layout, cfg):
            if backend is None or watchdog is None:
                raise ValueError("SnapshotPublisher under pp / tp needs the backend and the watchdog")
            trainers = backend.Collectives(rt.process_set(layout.role_ranks("trainer")))
            self.coll = backend.collectives.NumpyCollectives(trainers)
        self.peers = {r: TAGS[role] for role in ("evaluator", "generator") for r in layout.role_ranks(role)}
        self.ready: set[int] = set()
        self.inflight: dict[int, list] = {r: [] for r in self.peers}
        self.sent_step: dict[int, int | None] = {r: None for r in self.peers}
        self.sent = self.skipped = 0
        self.last_step = 0
        self.offer_s = []   # time each after_step took: what attaching roles costs a trainer step

    def after_step(self, step: int, engine) -> None:
        """Called after every training step; never waits for a role. Under pp/tp, on a step
        divisible by snapshot_every, every trainer joins one tiny broadcast (and, when some role
        is idle, the gather of the weights)."""
        t0 = time.perf_counter()
        self.last_step = step
        if self.root:
            for r in self.peers:
                self._poll(r)
        if step % self.every == 0:
            idle = [r for r in self.peers if r in self.ready and not self.inflight[r]] if self.root else []
            if self.root:
                self.skipped += len(self.peers) - len(idle)
            if self.coll is None:    # rank 0 alone: it holds the whole model
                if idle:
                    self._send(idle, step, self._gather(engine))
            else:
                with self.watchdog.deadline(self.timeout, f"the weight snapshot of step {step}"):
                    flag = self.coll.broadcast(np.array([len(idle)], np.int32), root=0, name="roles.idle")
                    if int(flag[0]):
                        flat = self._gather(engine)
                        if idle:
                            self._send(idle, step, flat)
        if self.root:
            self.offer_s.append(time.perf_counter() - t0)

    def _gather(self, engine) -> np.ndarray | None:
        """The whole parameters, flattened in the canonical order a role's pp = tp = 1 engine
        loads (params.param_shapes), on rank 0; None elsewhere. Only the ranks of data-parallel
        replica 0 take part (its tp groups and its pipeline hold one copy of the model)."""
        if self.coll is None:
            return engine.flat_params() if self.root else None
        if self.by_unit and self.layout.pp == 1:
            return self._gather_units(engine)
        # ZeRO-3 pipeline stages: a stage's units live in the shards of its dp group, so every
        # trainer joins its stage's gather (full_params); each replica's first stage then holds
        # the whole model, as the unsharded pipeline's replica 0 does
        if self.layout.dp_rank != 0 and not self.by_unit:
            return None
        full = engine.full_params()
        return self.flat_layout.flatten(full) if self.root else None

    def _gather_units(self, engine) -> np.ndarray | None:
        """ZeRO-3: every trainer joins one allgather per unit (engine.unit_params); rank 0 writes
        each unit into the flat snapshot as it arrives, so no rank holds more than one unit
        beyond the snapshot rank 0 sends."""
        at = dict(zip(self.flat_layout.names, self.flat_layout.offsets.tolist()))
        flat = np.empty(self.flat_layout.total, np.float32) if self.root else None
        seen = set()
        for part in engine.unit_params():
            if self.root:
                for n, a in part.items():
                    flat[at[n]:at[n] + a.size] = a.reshape(-1)
                seen.update(part)
        if self.root and seen != set(at):   # never send a snapshot with a part left unwritten
            raise ValueError(f"ZeRO-3 snapshot: the units missed {sorted(set(at) - seen)[:5]}")
        return flat

    def close(self, engine) -> None:
        """End of training: the final weights to every role that lacks them, then SHUTDOWN.
        Under pp/tp every trainer rank joins one last gather first (unconditionally: no decision
        to share); only rank 0 then waits for the roles."""
        step, flat = self.last_step, None
        if self.coll is not None:
            flat = self._gather(engine)
        if not self.root:
            return
        for r, t in self.peers.items():
            while True:
                if r not in self.ready:
                    self._take(r, p2p.recv_obj(self.comm, r, t, 2 * self.timeout,
                                               f"trainer rank 0: waiting for rank {r} to finish its "
                                               f"last snapshot"))
                if self.sent_step[r] == step:
                    break
                flat = engine.flat_params() if flat is None else flat
                self._send([r], step, flat)
            self.inflight[r].append(p2p.isend(self.comm, np.array([SHUTDOWN, step, 0, 0], np.float64), r, t))
        p2p.waitall([q for qs in self.inflight.values() for q in qs], self.timeout,
                    "trainer rank 0: snapshots and SHUTDOWN to the role ranks")
        self.write({"step": step, "role": "publisher", "snapshots_sent": self.sent,
                    "snapshots_skipped": self.skipped, "offer_s_total": sum(self.offer_s),
                    "offer_s_max": max(self.offer_s, default=0.0)})

    def _poll(self, r: int) -> None:
        self.inflight[r] = [q for q in self.inflight[r] if not q.test()]
        msg = self.comm.improbe(source=r, tag=self.peers[r])
        if msg is not None:
            self._take(r, msg.recv())

    def _take(self, r: int, ready: dict) -> None:
        self.ready.add(r)
        if ready.get("record"):
            self.write(ready["record"])

    def _send(self, ranks, step: int, flat: np.ndarray) -> None:
        flat = np.ascontiguousarray(flat, np.float32)
        hdr = np.array([SNAPSHOT, step, flat.size, 0], np.float64)
        for r in ranks:
            self.inflight[r] += [p2p.isend(self.comm, hdr, r, self.peers[r]),
                                 p2p.isend(self.comm, flat, r, self.peers[r])]
            self.ready.discard(r)
            self.sent_step[r] = step
            self.sent += 1


class SnapshotWorker:
    """An evaluator's or generator's loop: READY, wait for a snapshot, work on it, repeat."""

    role, time_key = "", ""

    def __init__(self, cfg, layout: Layout, comm, engine, tokens: data.TokenData):
        self.cfg, self.layout, self.comm, self.engine, self.data = cfg, layout, comm, engine, tokens
        self.tag, self.timeout = TAGS[self.role], cfg.train.step_timeout
        # Between snapshots trainers take snapshot_every steps and may evaluate, checkpoint and
        # sample, each under its own deadline; past this something is truly stuck.
        self.idle_s = self.timeout * (cfg.roles.snapshot_every + 4)
        self.n = param_server.flat_layout(task.model_config(cfg)).total

    def run(self) -> dict:
        record, done = None, []
        while True:
            hdr = np.empty(4, np.float64)
            req = p2p.irecv(self.comm, hdr, 0, self.tag)
            p2p.send_obj(self.comm, {"record": record}, 0, self.tag, self.timeout,
                         f"{self.role} rank {self.layout.rank}: READY to trainer rank 0")
            try:
                p2p.wait(req, self.idle_s, f"{self.role} rank {self.layout.rank}: waiting for a snapshot")
            except PeerTimeout as e:
                raise PeerTimeout(f"{e} (trainer rank 0 sends one every roles.snapshot_every steps)") from None
            if int(hdr[0]) == SHUTDOWN:
                return {"role": self.role, "rank": self.layout.rank, "snapshots": done}
            flat = np.empty(int(hdr[2]), np.float32)
            if flat.size != self.n:
                raise ValueError(f"{self.role}: snapshot of {flat.size} values, the model has {self.n}")
            p2p.recv_into(self.comm, flat, 0, self.tag, self.timeout, f"{self.role}: snapshot")
            self.engine.set_flat_params(flat)
            step = int(hdr[1])
            t0 = time.perf_counter()
            record = {"step": step, "role": self.role, "rank": self.layout.rank, **self.work(step)}
            record[self.time_key] = time.perf_counter() - t0
            done.append(step)

    def work(self, step: int) -> dict:
        raise NotImplementedError


class Evaluator(SnapshotWorker):
    role, time_key = "evaluator", "eval_time_s"

    def work(self, step: int) -> dict:
        t, m = self.cfg.train, self.cfg.model
        totals = np.zeros(3)
        # the trainers' evaluation windows: eval_batches global batches of dp x batch_size
        for x, y in data.eval_batches(self.data.val, m.block_size, t.batch_size * self.layout.dp,
                                      1, 0, t.eval_batches):
            r = self.engine.evaluate(x, y)
            totals += (r.loss_sum, r.correct, r.tokens)
        loss_sum, correct, tokens = totals
        return {"val_loss": loss_sum / tokens, "val_ppl": math.exp(loss_sum / tokens),
                "val_acc": correct / tokens}


class Generator(SnapshotWorker):
    role, time_key = "generator", "gen_time_s"

    def __init__(self, *args):
        super().__init__(*args)
        f = self.cfg.roles.prompts_file
        lines = Path(f).read_text().splitlines() if f else [self.cfg.train.sample_prompt]
        self.prompts = [ln for ln in lines if ln.strip()] or [self.cfg.train.sample_prompt]
        self.out = Path(self.cfg.train.out_dir) / "samples"

    def work(self, step: int) -> dict:
        t, tok = self.cfg.train, self.data.tokenizer
        texts = []
        for i, prompt in enumerate(self.prompts):
            ids = self.engine.generate(tok.encode(prompt), t.sample_tokens, 0.8, 40, t.seed + i)
            texts.append(f"### prompt {i}: {prompt!r}\n{prompt}{tok.decode(ids)}\n")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"step_{step:08d}_rank{self.layout.rank}.txt"
        path.write_text("\n".join(texts))
        return {"samples": str(path)}


# ---------------------------------------------------------------------------------------------
def run_role(cfg, rt, backend, evaluator=None, prepare=None) -> dict:
    """What a rank that is not a trainer does (cli.cmd_train): serve parameters, or evaluate /
    sample snapshots, until trainer rank 0 sends SHUTDOWN. A task other than the language
    model's passes its own evaluator loop and `prepare(cfg, rt) -> (data, cfg)` (classify:
    hvdllm/finetune.py; passed in, so this module does not import the trainer's side)."""
    layout = Layout.from_config(cfg, rt.size, rt.rank)
    role = layout.role()
    rt.require_mpi("parameter servers (ps.servers > 0)" if role == "server"
                   else "task separation (roles.evaluators / roles.generators)")
    loops = {"evaluator": Evaluator, "generator": Generator}
    if prepare is not None:   # e.g. labelled examples and their evaluation (hvdllm/finetune.py)
        tokens, cfg = prepare(cfg, rt)
        loops = {"evaluator": evaluator}
    else:
        tokens = data.prepare(cfg.data, rt.rank, timeout_s=cfg.train.step_timeout * 2)
        cfg = config.resolve(cfg, rt.size, tokens.tokenizer.vocab_size)
    if role == "server":
        return param_server.serve(cfg, layout, rt.comm)
    join_trainer_startup(cfg, layout, rt.comm)
    loop = loops[role]
    return loop(cfg, layout, rt.comm, role_engine(cfg, rt, backend), tokens).run()


def join_trainer_startup(cfg, layout: Layout, comm) -> None:
    """The MPI collectives over all ranks that trainers make while they build a pipeline engine
    (parallel.pp > 1): mpi/groups.subcomms' Split into pipeline groups, then, with
    parallel.partition = 'time', the broadcast of rank 0's measured layer times
    (strategies/pipeline.split_layers). Every rank of COMM_WORLD must join them, so an evaluator
    or generator joins with nothing to contribute (no colour, no value)."""
    if layout.pp <= 1:
        return
    from mpi4py import MPI
    comm.Split(MPI.UNDEFINED, layout.rank)   # MPI.COMM_NULL: this rank is in no pipeline
    if cfg.parallel.partition == "time":
        comm.bcast(None, root=0)


def role_engine(cfg, rt, backend):
    """An evaluator's or generator's own model, at lowered CPU priority (roles.nice: on a node
    shared with trainers the trainers keep their pace; a starved evaluator only skips snapshots).
    It is built on a one-rank Horovod process set (cli.process_set_groups), so building it never
    touches the trainers' collectives."""
    lower_priority(cfg.roles.nice)
    threads = cfg.train.threads or max(1, runtime.cores() // max(1, rt.local_size))
    backend.configure(threads, cfg.train.seed)
    from ..parallelize import build_solo_engine
    return build_solo_engine(cfg, rt, backend, (rt.rank,))


def lower_priority(by: int) -> None:
    """nice(2) moves only the calling thread on Linux (and the threads it starts later); Horovod's
    background thread, MPI's and the framework's pools already run, so each is reniced too
    (a TF evaluator whose pool kept nice 0 slowed its trainer 8%: hvdllm bench ps)."""
    mine = os.getpriority(os.PRIO_PROCESS, 0) + by
    os.nice(by)
    tasks = Path("/proc/self/task")
    for tid in (int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else ():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, max(mine, os.getpriority(os.PRIO_PROCESS, tid))))
        except OSError:   # the thread ended meanwhile
            pass


def final_barrier(cfg, rt) -> None:
    """Every rank, trainers and role ranks, meets here before leaving: the first process to exit
    shuts Horovod down for all, so a role rank released by SHUTDOWN must not leave while the
    trainers still run their last collectives. An MPI barrier (not Horovod), with a deadline."""
    if rt.comm is None or rt.size == 1:
        return
    # rank 0 may still sample and plot after releasing the role ranks
    p2p.wait(rt.comm.Ibarrier(), 3 * cfg.train.step_timeout, "the final barrier of all ranks")
