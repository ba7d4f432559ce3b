"""Pipeline-parallel schedules as plain instruction lists, plus a simulator that checks them.

The model's layers are cut into ``p`` stages on ``p`` ranks (``v`` chunks per rank for the
interleaved schedule: chunk ``c`` of stage ``s`` is virtual stage ``c*p + s``, ``p*v`` in all);
a batch is cut into ``m`` micro-batches. A schedule is, per stage, the ordered list of
:class:`Instr` that the stage executes. Messages travel between adjacent virtual stages only:
``send_act`` carries a micro-batch's output activation to virtual stage ``vs+1`` and
``send_grad`` carries the gradient w.r.t. that stage's input back to ``vs-1``. The first
virtual stage has no ``recv_act``/``send_grad``; the last computes the loss inside its
``forward`` and so has no ``send_act``/``recv_grad``. With ``p == 1`` neighbouring chunks live
on the same rank and pass tensors in memory: no messages at all.

Message order at each gap between two computations (see :func:`_lower`): activation messages
go before gradient messages, and a send of the previous output goes before the receive of
the next input. So on every link the upstream rank sends its activation and then receives a
gradient while the downstream rank receives the activation and then sends the gradient: each
pair of blocking calls meets in the same order on both sides, and the schedules run without
buffering (MPI_Ssend semantics) for GPipe and 1F1B; ``simulate(..., buffered=False)`` checks
that. The interleaved schedule needs non-blocking sends (see :func:`interleaved_1f1b`).
"""
from __future__ import annotations

from dataclasses import dataclass

from hvdllm.errors import HvdllmError

OPS = ("recv_act", "forward", "send_act", "recv_grad", "backward", "send_grad", "reduce_grads", "step")
COMPUTE = ("forward", "backward")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
_PEER = {"send_act": "recv_act", "send_grad": "recv_grad"}
_BEFORE = [("recv_act", "forward"), ("forward", "send_act"), ("forward", "backward"),
           ("recv_grad", "backward"), ("backward", "send_grad")]


@dataclass(frozen=True)
class Instr:
    """One step of one stage.

    ``op``: ``recv_act`` (block until micro-batch ``mb``'s input activation for ``chunk``
    arrives from the previous virtual stage), ``forward``, ``send_act`` (to the next virtual
    stage), ``recv_grad`` (block until the gradient of ``chunk``'s output arrives from the next
    virtual stage), ``backward``, ``send_grad`` (gradient of ``chunk``'s input, to the previous
    virtual stage), then ``reduce_grads`` (all-reduce over the data-parallel group) and ``step``
    (optimizer); those two carry ``mb = -1``.
    """

    op: str
    mb: int = -1
    chunk: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown pipeline instruction {self.op!r}; expected one of {OPS}")

    def __str__(self):
        return self.op if self.mb < 0 else f"{self.op}(mb={self.mb}, chunk={self.chunk})"


class ScheduleDeadlock(HvdllmError):
    """No stage can make progress although some still have instructions left."""

    def __init__(self, stuck: dict[int, Instr], mode: str):
        self.stuck = dict(stuck)
        lines = "\n".join(f"  stage {s}: waiting in {i}" for s, i in sorted(self.stuck.items()))
        super().__init__(f"pipeline schedule deadlocks ({mode} sends):\n{lines}")


# ----------------------------------------------------------------------------- building

def _links(p: int, v: int, stage: int, chunk: int) -> tuple[int, bool, bool]:
    """(virtual stage, has a remote predecessor, has a remote successor)."""
    vs = chunk * p + stage
    return vs, p > 1 and vs > 0, p > 1 and vs < p * v - 1


def _lower(compute: list[tuple[str, int, int]], p: int, stage: int, v: int) -> list[Instr]:
    """Turn the ordered computations ``(op, mb, chunk)`` of one stage into instructions.

    Each ``forward`` is preceded by its ``recv_act`` and followed by its ``send_act``; each
    ``backward`` by its ``recv_grad`` and ``send_grad``. Both messages of one gap go together,
    activations first, so that the two blocking calls on a link meet in the same order
    (rendezvous-safe, see the module docstring). ``reduce_grads`` and ``step`` close the list.
    """
    out: list[Instr] = []
    pending: list[Instr] = []  # the send of the previous computation's output
    for op, mb, chunk in compute:
        _, has_prev, has_next = _links(p, v, stage, chunk)
        gap = list(pending)
        if op == "forward" and has_prev:
            gap.append(Instr("recv_act", mb, chunk))
        if op == "backward" and has_next:
            gap.append(Instr("recv_grad", mb, chunk))
        out += sorted(gap, key=lambda i: i.op.endswith("grad"))  # stable: acts first
        out.append(Instr(op, mb, chunk))
        sends = has_next if op == "forward" else has_prev
        pending = [Instr("send_act" if op == "forward" else "send_grad", mb, chunk)] if sends else []
    return out + pending + [Instr("reduce_grads"), Instr("step")]


def _check_args(p: int, m: int, stage: int, v: int = 1) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"pipeline schedule needs p >= 1, m >= 1, v >= 1 (got p={p}, m={m}, v={v})")
    if not 0 <= stage < p:
        raise ValueError(f"stage {stage} out of range for {p} pipeline stages")


def gpipe(p: int, m: int, stage: int) -> list[Instr]:
    """GPipe: all ``m`` forwards (recv_act, forward, send_act each), then all backwards.

    Backwards run in *reverse* micro-batch order (m-1 first): the last stage can start on the
    micro-batch whose forward it has just finished, as autograd would on the summed loss, and
    each stage receives gradients in the order the next stage produces them. Same order would
    give the same makespan; either way all ``m`` activations are held at the peak.
    """
    _check_args(p, m, stage)
    order = [("forward", i, 0) for i in range(m)] + [("backward", i, 0) for i in reversed(range(m))]
    return _lower(order, p, stage, 1)


def one_f_one_b(p: int, m: int, stage: int) -> list[Instr]:
    """PipeDream-flush 1F1B: ``w = min(p-stage-1, m)`` warm-up forwards, then alternate one
    forward (mb ``w+k``) with one backward (mb ``k``), then the ``w`` remaining backwards.

    Backwards go in micro-batch order; a stage never holds more than ``min(p-stage, m)``
    activations. In the steady state the stage sends ``act(w+k)`` downstream and then
    receives ``grad(k)`` from downstream; upstream it receives ``act(w+k+1)`` and then sends
    ``grad(k)`` -- the order its neighbours use, so blocking sends cannot deadlock.
    """
    _check_args(p, m, stage)
    w = min(p - stage - 1, m)
    order = [("forward", i, 0) for i in range(w)]
    for k in range(m - w):
        order += [("forward", w + k, 0), ("backward", k, 0)]
    order += [("backward", k, 0) for k in range(m - w, m)]
    return _lower(order, p, stage, 1)


def _interleaved_table(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """Forward order ``(mb, chunk)``: each group of ``p`` micro-batches goes through chunk 0,
    then chunk 1, ... -- exactly ``p`` forwards later the last stage has the group's first
    activation ready for the next chunk, so stage 0 never waits on the ring."""
    return [(g + i, c) for g in range(0, m, p) for c in range(v) for i in range(p)]


def interleaved_1f1b(p: int, m: int, stage: int, v: int) -> list[Instr]:
    """Megatron's interleaved 1F1B with ``v`` model chunks per rank (``v == 1``: plain 1F1B).

    The k-th forward is ``_interleaved_table(...)[k]``; the k-th backward is the same entry
    with the chunk mirrored (``v-1-chunk``), since gradients go through the chunks in reverse.
    Warm-up is Megatron's ``(p-stage-1)*2 + (v-1)*p`` forwards (capped at ``m*v``), then one
    forward / one backward, then the remaining backwards. The extra ``p-stage-1`` warm-up
    forwards (``simulate`` shows the same bubble without them when ``comm_time == 0``) give one
    micro-batch of slack per downstream hop, which hides the p2p latency when it is not 0.
    Messages go round the ring: stage ``p-1``'s chunk ``c`` sends activations to stage 0's
    chunk ``c+1`` and receives gradients from it. Sends must be non-blocking (MPI_Isend,
    ``simulate(buffered=True)``): for ``p, v >= 2`` rendezvous sends deadlock, because a stage
    sends several activations ahead of the gradient its neighbour sends first.
    ``m`` must be a multiple of ``p`` as in Megatron (otherwise some cases deadlock).
    """
    _check_args(p, m, stage, v)
    if v == 1:
        return one_f_one_b(p, m, stage)
    if m % p:
        raise ValueError(f"interleaved pipeline schedule needs the number of micro-batches ({m}) "
                         f"to be a multiple of the number of stages ({p})")
    table = _interleaved_table(p, m, v)
    total = len(table)
    fwd = [("forward", mb, c) for mb, c in table]
    bwd = [("backward", mb, v - 1 - c) for mb, c in table]
    w = min((p - stage - 1) * 2 + (v - 1) * p, total)
    order = fwd[:w]
    for k in range(total - w):
        order += [fwd[w + k], bwd[k]]
    order += bwd[total - w:]
    return _lower(order, p, stage, v)


def build(name: str, p: int, m: int, stage: int, v: int = 1) -> list[Instr]:
    """The schedule called ``name`` ("gpipe" | "1f1b" | "interleaved") for one stage."""
    if name == "interleaved":
        return interleaved_1f1b(p, m, stage, v)
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule: unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")
    if v != 1:
        raise ValueError(f"parallel.schedule: {name!r} runs one model chunk per stage (got v={v}); use 'interleaved'")
    return gpipe(p, m, stage) if name == "gpipe" else one_f_one_b(p, m, stage)


def ideal_bubble(p: int, m: int, v: int = 1) -> float:
    """Idle fraction of an ideal pipeline: ``(p-1) / (v*m + p-1)``."""
    return (p - 1) / (v * m + p - 1)


# ----------------------------------------------------------------------------- checking

def validate_schedule(schedules: list[list[Instr]], p: int, m: int, v: int = 1) -> None:
    """Raise ``ValueError`` listing every problem: each stage must run, for every (mb, chunk),
    exactly one forward and one backward (backward after forward), receive its input before
    the forward and send its output after it, and end with ``reduce_grads`` then ``step``.
    Every send then has exactly one matching receive on the neighbouring virtual stage."""
    problems = []
    if len(schedules) != p:
        problems.append(f"expected {p} stage schedules, got {len(schedules)}")
    for s, instrs in enumerate(schedules[:p]):
        if [i.op for i in instrs[-2:]] != ["reduce_grads", "step"] or \
                sum(i.op in ("reduce_grads", "step") for i in instrs) != 2:
            problems.append(f"stage {s}: must end with exactly one reduce_grads then one step")
        pos: dict[tuple[str, int, int], list[int]] = {}
        for n, i in enumerate(instrs):
            if i.op not in ("reduce_grads", "step"):
                if not (0 <= i.mb < m and 0 <= i.chunk < v):
                    problems.append(f"stage {s}: {i} out of range (m={m}, v={v})")
                pos.setdefault((i.op, i.mb, i.chunk), []).append(n)
        for c in range(v):
            _, has_prev, has_next = _links(p, v, s, c)
            want = {"forward": True, "backward": True, "recv_act": has_prev, "send_grad": has_prev,
                    "send_act": has_next, "recv_grad": has_next}
            for mb in range(m):
                at = {}
                for op, needed in want.items():
                    found = pos.get((op, mb, c), [])
                    if len(found) != int(needed):
                        problems.append(f"stage {s}: {op}(mb={mb}, chunk={c}) appears {len(found)}x, "
                                        f"expected {int(needed)}")
                    elif needed:
                        at[op] = found[0]
                for a, b in _BEFORE:
                    if a in at and b in at and at[a] > at[b]:
                        problems.append(f"stage {s}: {b}(mb={mb}, chunk={c}) comes before {a}")
    if problems:
        raise ValueError("invalid pipeline schedule:\n" + "\n".join(f"  - {x}" for x in problems))


# ----------------------------------------------------------------------------- simulating

@dataclass(frozen=True)
class Event:
    start: float
    end: float
    op: str
    mb: int
    chunk: int


@dataclass
class SimResult:
    """Per-stage timelines of every instruction (receives span their wait), the makespan, the
    bubble ``1 - busy / (p * makespan)`` and the peak number of (mb, chunk) activations held."""
    p: int
    v: int
    timelines: list[list[Event]]
    makespan: float
    bubble: float
    peak_inflight: list[int]


class _Sim:
    """State of one simulation: program counters, clocks, mailbox and local tensors."""

    def __init__(self, schedules, p, v, fwd, bwd, comm, buffered):
        self.sch, self.p, self.v, self.comm, self.buffered = schedules, p, v, comm, buffered
        self.cost = {"forward": fwd / v, "backward": bwd / v}  # a chunk is 1/v of a stage
        self.pc, self.clock = [0] * p, [0.0] * p
        self.events: list[list[Event]] = [[] for _ in range(p)]
        self.have: list[set] = [set() for _ in range(p)]  # ("act"|"grad"|"F"|"B", mb, vs)
        self.mail: dict[tuple, float] = {}
        self.live, self.peak = [0] * p, [0] * p

    def cur(self, s):
        return self.sch[s][self.pc[s]] if self.pc[s] < len(self.sch[s]) else None

    def done(self, s, instr, start, end):
        self.events[s].append(Event(start, end, instr.op, instr.mb, instr.chunk))
        self.clock[s], self.pc[s] = end, self.pc[s] + 1

    def need(self, s, key, instr, what):
        if key not in self.have[s]:
            raise ValueError(f"invalid pipeline schedule: stage {s} runs {instr} before {what}")

    def compute(self, s, i):
        vs, last = i.chunk * self.p + s, self.p * self.v - 1
        if i.op == "forward":
            if vs > 0:
                self.need(s, ("act", i.mb, vs), i, "its input activation arrived")
            self.have[s].add(("F", i.mb, vs))
            self.live[s] += 1
            self.peak[s] = max(self.peak[s], self.live[s])
            if vs == last:
                self.have[s].add(("grad", i.mb, vs))  # the loss is computed here
            elif self.p == 1:
                self.have[s].add(("act", i.mb, vs + 1))  # next chunk is local
        else:
            self.need(s, ("F", i.mb, vs), i, "its forward")
            self.need(s, ("grad", i.mb, vs), i, "its output gradient arrived")
            self.have[s].add(("B", i.mb, vs))
            self.live[s] -= 1
            if self.p == 1 and vs > 0:
                self.have[s].add(("grad", i.mb, vs - 1))
        self.done(s, i, self.clock[s], self.clock[s] + self.cost[i.op])

    def route(self, s, i):
        """(message key, destination stage, the receive that matches) of a send."""
        vs = i.chunk * self.p + s
        to = vs + 1 if i.op == "send_act" else vs - 1
        kind = "act" if i.op == "send_act" else "grad"
        self.need(s, ("F" if kind == "act" else "B", i.mb, vs), i, "the computation producing it")
        return (kind, i.mb, to), to % self.p, Instr(_PEER[i.op], i.mb, to // self.p)

    def step(self, s) -> bool:
        """Run stage ``s``'s next instruction if it can run now; True if it ran."""
        i = self.cur(s)
        if i is None:
            return False
        if i.op in COMPUTE:
            self.compute(s, i)
        elif i.op in ("reduce_grads", "step"):
            self.done(s, i, self.clock[s], self.clock[s])
        elif i.op in _PEER:
            key, d, match = self.route(s, i)
            if self.buffered:
                if key in self.mail:
                    raise ValueError(f"invalid pipeline schedule: stage {s} sends {i} twice")
                self.mail[key] = self.clock[s] + self.comm
                self.done(s, i, self.clock[s], self.clock[s])
            elif self.cur(d) == match:  # rendezvous: both sides block until they meet
                t = max(self.clock[s], self.clock[d]) + self.comm
                self.done(s, i, self.clock[s], t)
                self.have[d].add(key)
                self.done(d, match, self.clock[d], t)
            else:
                return False
        else:  # a receive: buffered reads the mailbox, rendezvous is completed by the sender
            key = (i.op[5:], i.mb, i.chunk * self.p + s)
            if not self.buffered or key not in self.mail:
                return False
            self.have[s].add(key)
            self.done(s, i, self.clock[s], max(self.clock[s], self.mail.pop(key)))
        return True


def simulate(schedules: list[list[Instr]], p: int, v: int = 1, fwd_time: float = 1.0,
             bwd_time: float = 2.0, comm_time: float = 0.0, buffered: bool = True) -> SimResult:
    """Run all stages together, each instruction as soon as its dependencies allow.

    ``fwd_time``/``bwd_time`` are per micro-batch per *stage*, so one chunk takes ``1/v`` of
    it. ``buffered=True``: a send returns at once (MPI_Isend into a large enough buffer) and
    its message can be received ``comm_time`` later. ``buffered=False``: rendezvous
    (MPI_Ssend) -- sender and receiver block until both reached the matching pair, which then
    completes on both ``comm_time`` after the later one arrived. Messages match on
    (direction, mb, destination virtual stage). Raises :class:`ScheduleDeadlock` when no stage
    can progress and ``ValueError`` when a stage computes on data it does not have.
    """
    if len(schedules) != p:
        raise ValueError(f"expected {p} stage schedules, got {len(schedules)}")
    sim = _Sim(schedules, p, v, fwd_time, bwd_time, comm_time, buffered)
    while any(sim.cur(s) is not None for s in range(p)):
        moved = False
        for s in range(p):
            while sim.step(s):
                moved = True
        if not moved:
            stuck = {s: sim.cur(s) for s in range(p) if sim.cur(s) is not None}
            raise ScheduleDeadlock(stuck, "buffered" if buffered else "rendezvous")
    makespan = max((e.end for tl in sim.events for e in tl), default=0.0)
    busy = sum(e.end - e.start for tl in sim.events for e in tl if e.op in COMPUTE)
    bubble = 1.0 - busy / (p * makespan) if makespan > 0 else 0.0
    return SimResult(p, v, sim.events, makespan, bubble, sim.peak)


def to_chrome_trace(result: SimResult, us_per_unit: float = 1000.0) -> dict:
    """Chrome trace-event JSON (chrome://tracing, Perfetto): one thread per stage, one
    complete ("X") event per forward/backward, named like ``F3.1`` (mb 3, chunk 1)."""
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
              for s in range(result.p)]
    for s, tl in enumerate(result.timelines):
        for e in tl:
            if e.op in COMPUTE:
                name = f"{e.op[0].upper()}{e.mb}" + (f".{e.chunk}" if result.v > 1 else "")
                events.append({"name": name, "cat": e.op, "ph": "X", "pid": 0, "tid": s,
                               "ts": e.start * us_per_unit, "dur": (e.end - e.start) * us_per_unit,
                               "args": {"mb": e.mb, "chunk": e.chunk}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
