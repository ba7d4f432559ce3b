"""ZeRO stages 2 and 3 (fully sharded data parallel): gradients, and at stage 3 the parameters
too, sharded over the data-parallel group, one unit at a time.

Units. A unit is a layer of the built-in model (parallel.zero_unit = "block", the only value so
far): 0 = embeddings, 1..L = blocks, L+1 = head (hvdllm.params.layer_params). A unit owns the
parameters it lists first; a parameter it uses but another unit owns is borrowed (the tied head
borrows `wte` from the embedding unit). Per unit a FlatLayout of its (tp-local) owned parameters
is zero-padded to a multiple of dp and cut into dp equal shards; this rank keeps shard
`dp_rank` of every unit, all concatenated into one flat vector (the master copy of its
parameters), and AdamW moments for exactly that vector (optim.DeviceAdamW, on the backend's
tensors through `comm.ops`, as ZeRO-1). Under tensor parallelism each tp rank's slices are
sharded over its own dp group, and the clipping norm sums the sharded kinds over the tp group
(Zero1's 'sharded' / 'replicated').

The step, driven here, on a backend's primitives (`run`, see Runner): for each micro-batch the
units' forward in order, then their backward in reverse, each unit's backward on the gradient
of its output only (the pipeline engines' chunk trick, per unit). As soon as unit u's backward
has produced its gradients they are flattened, padded and reduce-scattered (average) over the
dp group, and only this rank's shard is kept (summed over micro-batches): no full-size
gradient of the model exists at any time, only one unit's (and the borrowed `wte` gradient,
held from the head's backward until the embedding's). After the last backward: the global
norm from the shards (one allreduce of squared norms, plus one over the tp group), clipping,
AdamW on the shard. Then
  stage 2: parameters stay whole on every rank: the updated shards are allgathered (one
           message, every unit's shard in it) and written into the model;
  stage 3: parameters live only as shards. A unit's whole weights are allgathered just before
           its forward and freed after it, gathered again for its backward and freed after it.
           The next unit's gather is issued one unit ahead (prefetch depth 1) where the backend
           can overlap it (`gather_async`: torch's Horovod allgather_async / synchronize,
           TensorFlow's blocking allgather on a thread of its own, GatherAhead; neither beside
           tp, whose allreduces in the unit would race it across process sets), so at most two
           units' needs are materialised at once (what the overlap was measured to give:
           torch_backend/sharded.py, tf_backend/sharded.py). Units the next position needs
           stay (the head's forward runs straight into its backward, a micro-batch's embedding
           backward into the next one's forward).
Messages per micro-batch (dp group): stage 2: one reduce-scatter per unit; stage 3: one
allgather per unit in the forward and one per unit in the backward (fewer where a unit stays),
one reduce-scatter per unit; per step: one allreduce (norm) and, stage 2, one allgather.
So stage 3 moves 1.5x an allreduce's bytes per micro-batch (the ZeRO paper's 3Ψ vs 2Ψ).

Accumulation (aggregation.accumulation = k): one reduce-scatter per unit per micro-batch, the
shards summed. The trade: k x the gradient traffic of a single reduction, for memory that stays
1/dp (accumulating whole gradients over the micro-batches would hold the full-size gradient
this strategy exists to avoid; stage 3 re-gathers each unit per micro-batch anyway).

How a backend keeps a unit's autograd state while its weights are freed (stage 3) is its own
choice: torch keeps the forward's graph and frees the weights' storage in between (PyTorch
FSDP1's trick: the parameters are pointed through `.data` at a storage-less husk and back into
the gathered vector, so autograd's version counters do not move, and nothing is copied);
TensorFlow's GradientTape would hold the gathered weights alive, so it
recomputes the unit's forward under a tape in the backward (activation checkpointing per unit:
one more forward per unit, for no weights or tape held between forward and backward). Its
Horovod ops block in eager mode, so its gathers ahead run on a thread (GatherAhead).

Start-up (stage 3): the backend builds its model without values (torch: parameters of 0 bytes'
storage, TensorFlow: no variables); each unit's initial values are drawn alone (unit_values:
params.init_groups, one pass over the whole-model init's generator, so the values are the same),
sent from dp rank 0, sharded, and dropped before the next unit is drawn. A rank never holds the
whole model: its peak is its shards (twice, while they are joined) and one unit, beside the
optimizer's state. Loading a checkpoint or train.init_from's weights (a Hugging Face folder or a
run) reads only this rank's ranges, one parameter at a time (load, checkpoint.Sharded.slice).

Offload (parallel.offload = "optimizer"): the master shard and its AdamW moments live on the
host as numpy (optim.FlatAdamW, the in-place numpy path); per step the clipped gradient shard
crosses to_host once and the new parameter shard from_host once.

Pipelines (parallel.pp > 1, ShardedStageBase below): each stage shards its own units (its
blocks, the embeddings on the first stage, the head on the last, each stage's unit owning its
copy of a tied wte) over its dp group; the schedule (pipeline.py) calls each chunk's forward and
backward per micro-batch, which run its units one at a time (stage_forward / stage_backward),
each unit's gradient reduce-scattered as above. The two units holding the tied wte keep their
gradient whole over the step instead, so that the end stages can sum their wte gradients (the
unsharded pipeline's exchange) before its reduce-scatter: identical shards, identical steps.

fp16 (train.precision, loss_scale.py): each micro-batch's loss starts its backward from the
loss scale (a float the runner's unit_backward takes for dy), so every gradient shard carries
it; _update divides the norm and the clip factor by it. The norm is the job's (summed over
the dp group, the tp group and, in a pipeline, every stage before it is read), so where one
rank overflowed every rank skips the step: no shard, moment or AdamW step count moves (at
stage 3 the shards are the weights: nothing else holds them), and stage 2 publishes nothing.
A pipeline stage's loss starts from the scaler's scale; the testing aid's overflow enters at
the step's end on its rank (finish_stage), as the unsharded pipeline's does.

Checkpoints stay sharded: every dp rank saves the ranges of every parameter and both moments
that its shards hold, as placement.ranged pieces of its tp slice; nothing is gathered, and a
loader joins the ranges (checkpoint.Sharded), so they load at any layout, ZeRO or not.
"""
from __future__ import annotations

import math
import sys
import threading
from typing import Protocol

import numpy as np

from .. import params, placement, task
from ..engines import GPTEngineBase, PipelineStageBase, gather_full
from ..errors import ConfigError, HvdllmError
from ..flat import FlatLayout, ops_of
from ..memory import zero_state_bytes
from ..optim import DeviceAdamW, FlatAdamW, clip_coef
from . import pipeline as pl
from . import tensor_parallel as tp_plan
from .zero import kind_spans


class Runner(Protocol):
    """What a backend supplies to the sharded step (torch_backend/sharded.py, tf_backend/sharded.py)."""

    def unit_forward(self, u: int, x, target):
        """Unit u on x (token ids for u = 0, else the previous unit's output); target given
        only for the last unit, which then returns its loss divided by the micro-batches.
        Returns (output, handle for unit_backward)."""

    def unit_backward(self, u: int, handle, dy):
        """(gradient of the unit's input or None for u = 0, [gradient of each name in
        uses[u]]) from the output's gradient dy (for the loss: None, or a float, the loss scale
        train.precision = 'fp16' starts the backward from)."""

    def concat_flat(self, tensors):
        """One flat vector of the tensors (hvdllm.engines)."""

    def load_unit(self, names: list[str], flat) -> None:
        """Write a unit's whole owned parameters from their flat vector (stage 3: materialise
        them)."""

    def free_unit(self, names: list[str]) -> None:
        """Stage 3: drop the unit's whole parameters (only its shard stays)."""

    # optional: grad_flat(tensors), concat_flat's vector in a buffer the backend reuses (called
    # only at dp > 1, once per unit, its result consumed by the reduce-scatter before the next)


def units_of(model_cfg, layers=None) -> tuple[list[list[str]], list[list[str]]]:
    """(uses, owned) per unit (parallel.zero_unit = "block": each layer of hvdllm.params, the
    embeddings, every block, the head; `layers`: a pipeline stage's, default all): the parameter
    names unit u's computation reads, and those it owns (the first unit to list a name owns it;
    the tied head borrows wte from the embeddings, or owns the last stage's copy of it)."""
    layers = range(params.n_layers(model_cfg)) if layers is None else layers
    uses = [params.layer_params(model_cfg, i) for i in layers]
    seen, owned = set(), []
    for names in uses:
        owned.append([n for n in names if n not in seen])
        seen.update(names)
    return uses, owned


def units_for(cfg, ids=None) -> tuple[list[list[str]], list[list[str]]]:
    """units_of for the run's model (a classifier's head in the last unit, task.model_config);
    under LoRA (hvdllm/lora.py) only what trains: each unit's adapters (and the head), so only
    they are reduce-scattered, sharded and stepped. The frozen base stays whole on every rank at
    both stages: it gets no gradient and no optimizer state, so ZeRO's savings do not apply to
    it, and gathering it per unit at stage 3 would move 1.5x the base's bytes per micro-batch to
    save memory the base already costs a plain dp run."""
    from .. import lora
    uses, owned = units_of(task.model_config(cfg), ids)
    if lora.enabled(cfg):
        uses = lora.units(cfg, uses)
        owned = [list(names) for names in uses]
    return uses, owned


def unit_values(model_cfg, seed: int, owned, cut=None):
    """Each unit's initial values as one flat float32 vector of its owned (tp-local, `cut`)
    parameters, one unit at a time (params.init_groups: the whole-model init's values, in one
    pass): ZeRO-3 shards each and drops it, so a rank never holds the whole model."""
    for names, values in zip(owned, params.init_groups(model_cfg, seed, owned, cut)):
        yield np.concatenate([values.pop(n).reshape(-1) for n in names])


def paper_bytes(n_params: int, dp: int, stage: int, offload: str = "none", live_unit: int = 0,
                prefetch: int = 1) -> dict:
    """The ZeRO paper's per-rank bytes (AdamW, fp32), from hvdllm/memory.py's formula."""
    return zero_state_bytes(n_params, dp, stage, offload, live_unit=live_unit, prefetch=prefetch)


class GatherAhead:
    """Stage 3's gathers issued ahead for a backend whose allgather blocks until it is done
    (Horovod's TensorFlow ops in eager mode): `gather(tensor, name)` runs on one background
    thread while the caller computes, and ZeroSharded takes (start, finish) as its
    gather_async. One thread, fed in the order the gathers are issued, which is the same on
    every rank (the names are too, `zero.gather.<unit>.<phase>`: Horovod matches the ranks' ops
    by name, so the thread's gather and the caller's reduce-scatter of the same process set may
    reach it in either order). The thread runs no framework code of its own but the gather,
    which releases the GIL while it waits on the wire and copies.

    finish waits for a gather within `timeout_s` (train.step_timeout), then raises TimeoutError
    (ZeroSharded says which unit); an exception in the gather is raised again by its finish.
    close() stops the thread: at the end of the run (the engine's close) and when a step fails
    (ShardedEngineBase.train_step). A gather stuck on the wire cannot be interrupted: the thread
    is a daemon, so it never keeps the process alive, and close() waits for it only briefly."""

    def __init__(self, gather, timeout_s: float):
        self.gather, self.timeout_s = gather, timeout_s
        self._queue, self._thread, self._closed = None, None, False

    class _Job:
        def __init__(self, tensor, name):
            self.tensor, self.name = tensor, name
            self.done, self.result, self.error = threading.Event(), None, None

    def _work(self, jobs) -> None:
        while True:
            job = jobs.get()
            if job is None:   # close()
                return
            try:
                job.result = self.gather(job.tensor, job.name)
            except BaseException as e:   # raised again by finish, in the caller
                job.error = e
            job.tensor = None   # the shard's reference: the result is all the caller needs
            job.done.set()

    def start(self, tensor, name: str):
        """Issue gather(tensor, name) on the thread (started on first use) -> its handle."""
        if self._closed:
            raise HvdllmError(f"parallel.zero = 3: gather {name!r} issued after the gather thread was stopped")
        if self._thread is None:
            import queue
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._work, args=(self._queue,), name="hvdllm-zero-gather",
                                            daemon=True)
            self._thread.start()
        job = self._Job(tensor, name)
        self._queue.put(job)
        return job

    def finish(self, job):
        """The gathered tensor of start's handle, within the deadline."""
        if not job.done.wait(self.timeout_s):
            raise TimeoutError(f"allgather {job.name!r} not done within {self.timeout_s:g} s "
                               f"(train.step_timeout): a dp rank is stalled or has left the job")
        if job.error is not None:
            raise job.error
        out, job.result = job.result, None
        return out

    def close(self, wait_s: float = 5.0) -> bool:
        """Stop the thread (no gather may be issued after); True if it ended within wait_s."""
        self._closed = True
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout=min(wait_s, self.timeout_s))
        return not self._thread.is_alive()


PHASES = {"f": "forward", "b": "backward", "e": "evaluation"}   # materialise's tags


class ZeroSharded:
    """`uses` / `owned`: per unit, the names it reads and owns (units_of); `shapes`: {name: the
    tp-local shape}; `comm`: the dp group's Collectives (a backend's, on its tensors; the unit
    tier's simulator on numpy); `stage`: 2 or 3. `tp`, `kind`: as Zero1's (the tp group's
    Collectives and each name's norm kind). `gather_async`: (start(tensor, name) -> handle,
    finish(handle) -> tensor) where the backend's allgather can run behind compute, else None.
    `offload`: 'none' or 'optimizer'. `sqnorms`: the backend's replacement for ops.sqnorms
    where its float32 dot over a long span is not accurate enough for the norm (TensorFlow)."""

    def __init__(self, uses, owned, shapes, comm, optim_cfg, agg_cfg, stage: int, tp=None, kind=None,
                 gather_async=None, offload: str = "none", sqnorms=None, ids=None, pp_sum=None, defer=()):
        if stage not in (2, 3):
            raise ValueError(f"ZeroSharded is ZeRO stage 2 or 3, got {stage}")
        self.uses, self.owned, self.stage = uses, owned, stage
        # a pipeline stage (ShardedStageBase): `ids` the model's index of each unit (the runner's
        # u), `pp_sum` the norm's float summed over the pipeline, `defer` the units whose
        # gradients wait whole for the step's end (the tied wte's exchange between the stages)
        self.ids = list(range(len(uses))) if ids is None else list(ids)
        self.pp_sum, self.defer, self.deferred = pp_sum, set(defer), {}
        self.comm, self.optim_cfg, self.agg, self.tp = comm, optim_cfg, agg_cfg, tp
        self.ops = ops_of(comm)
        self.k, self.i = comm.size, comm.rank
        self.gather_async, self.offload = gather_async, offload
        self.sqnorms = sqnorms or self.ops.sqnorms
        self.layouts = [FlatLayout({n: shapes[n] for n in names}) for names in owned]
        owner = {n: u for u, names in enumerate(owned) for n in names}
        # units that own parameters: under LoRA (units_for) a unit may own none (a block without
        # adapters, the LM head): nothing of it is sharded, gathered or reduced, and no backward
        # runs below the lowest unit that owns some (nothing under it would get a gradient)
        self.active = [u for u, lay in enumerate(self.layouts) if lay.total]
        self.lowest = self.active[0]
        # stage 3: the units whose weights unit u's computation needs materialised
        self.needs = [sorted(({u} | {owner[n] for n in names}) & set(self.active)) for u, names in enumerate(uses)]
        self.borrowed = [[n for n in names if owner[n] != u] for u, names in enumerate(uses)]
        self.n = [lay.padded_total(self.k) // self.k for lay in self.layouts]    # shard length per unit
        self.off = np.concatenate([[0], np.cumsum(self.n)]).astype(np.int64)
        self.size = int(self.off[-1])                                           # this rank's elements
        masks = []
        for lay in self.layouts:
            lo, hi = lay.shard_range(self.k, self.i)
            pad = np.zeros(lay.padded_total(self.k) - lay.total, bool)
            masks.append(np.concatenate([lay.decay_mask() if lay.total else pad, pad])[lo:hi])
        mask = np.concatenate(masks)
        self.opt = FlatAdamW(self.size, mask, optim_cfg) if offload == "optimizer" \
            else DeviceAdamW(self.size, mask, optim_cfg, self.ops)
        self.spans = kind_spans(self._pieces(), kind)
        self.p = None          # this rank's shard of every unit, concatenated (the backend's vector)
        self.p_host = None     # offload: the master shard on the host
        self.live, self.pending = set(), {}
        self.peak_param_bytes = 0

    # parameters ------------------------------------------------------------------------------
    def init_params(self, unit_flats) -> None:
        """This rank's shards from each unit's whole flat vector (backend tensors), read one unit
        at a time (an iterator may build each just before it is read): a copy of its shard is
        kept (through the host: a device slice may be a view that keeps the whole unit alive),
        the unit's vector dropped before the next one is built; then one concatenation, so at
        most two copies of the shards exist at once."""
        ops, pieces = self.ops, []
        for lay, flat in zip(self.layouts, unit_flats):
            if not lay.total:
                continue
            pieces.append(ops.from_host(ops.to_host(lay.shard(flat, self.k, self.i, ops))))
            del flat
        self._set_shard(ops.concat(pieces))

    def _set_shard(self, p) -> None:
        self.p = p
        if self.offload == "optimizer":
            self.p_host = self.ops.to_host(p).astype(np.float32, copy=False)

    def unit_shard(self, u: int):
        return self.p[int(self.off[u]):int(self.off[u + 1])]

    def publish(self, run) -> None:
        """Stage 2: every unit's whole parameters from the shards (one allgather)."""
        full = self.comm.allgather(self.p, name="zero.params") if self.k > 1 else self.p
        for u in self.active:
            run.load_unit(self.owned[u], self._whole(full, u, self.size)[:self.layouts[u].total])

    def _whole(self, full, u: int, stride: int):
        """Unit u's padded flat vector from an allgather of every rank's concatenated shards."""
        a, b = int(self.off[u]), int(self.off[u + 1])
        if self.k == 1:
            return full[a:b]
        return self.ops.concat([full[r * stride + a:r * stride + b] for r in range(self.k)])

    def param_bytes(self) -> int:
        """Parameter bytes this rank holds now: its shards, plus (stage 3) the units gathered or
        being gathered; stage 2: the whole model part."""
        if self.stage == 2:
            return 4 * sum(lay.total for lay in self.layouts)
        return 4 * (self.size + sum(self.layouts[u].total for u in self.live | set(self.pending)))

    def _track(self) -> None:
        self.peak_param_bytes = max(self.peak_param_bytes, self.param_bytes())

    # stage 3: which units are materialised ---------------------------------------------------
    def _start(self, u: int, tag: str) -> None:
        if u in self.live or u in self.pending:
            return
        shard = self.unit_shard(u)
        if self.k == 1:
            self.pending[u] = ("done", shard, tag)
        elif self.gather_async is not None:   # names unique among the gathers in flight
            self.pending[u] = ("async", self.gather_async[0](shard, f"zero.gather.{u}.{tag}"), tag)
        else:   # one name for every unit: TensorFlow traces one function per name and group
            self.pending[u] = ("done", self.comm.allgather(shard, name="zero.gather"), tag)
        self._track()

    def _finish(self, run, u: int) -> None:
        how, h, tag = self.pending.pop(u)
        if how == "async":
            try:
                h = self.gather_async[1](h)
            except Exception as e:   # which unit, which phase; a failed collective keeps its type
                what = (f"parallel.zero = 3: the gather of unit {self.ids[u]}'s weights, issued one unit ahead "
                        f"in the {PHASES.get(tag, tag)}, failed")
                if isinstance(e, TimeoutError):
                    raise HvdllmError(f"{what}: {e}") from e
                e.add_note(what)   # (Horovod's elastic mode tells a lost peer by HorovodInternalError)
                raise
        run.load_unit(self.owned[u], h[:self.layouts[u].total])
        self.live.add(u)

    def materialise(self, run, now, nxt, tag: str) -> None:
        """Units `now` whole (waiting for their gathers), then the gathers of `nxt` issued ahead."""
        for u in now:
            self._start(u, tag)
        if self.gather_async is not None:   # a synchronous gather ahead would only hold memory sooner
            for u in nxt:
                self._start(u, tag)
        for u in now:
            if u not in self.live:
                self._finish(run, u)

    def release(self, run, keep) -> None:
        """Free every materialised unit that `keep` does not need."""
        for u in sorted(self.live - set(keep)):
            run.free_unit(self.owned[u])
            self.live.discard(u)

    def release_all(self, run) -> None:
        for u in list(self.pending):
            self._finish(run, u)
        self.release(run, ())

    # the step --------------------------------------------------------------------------------
    def step(self, run, xs, ys, lr: float, scale: float | None = None, seed: float | None = None):
        """One optimizer step over the micro-batches xs[j], ys[j] (the backend's tensors).
        Returns (this rank's loss: the sum of the micro-batches' loss / k, a backend scalar;
        the global gradient norm before clipping, a float). train.precision = 'fp16': each
        loss's backward starts from `seed` (this rank's loss scale: the scaler's, or the
        testing aid's inf), and `scale` (the scaler's, the same on every rank) unscales the
        norm and the update; a step whose job-wide norm is not finite changes nothing (_update)."""
        U = len(self.layouts)
        order = [(ph, u, mb) for mb in range(len(xs))
                 for ph, units in (("f", range(U)), ("b", range(U - 1, self.lowest - 1, -1))) for u in units]
        needs = [self.needs[u] for _, u, _ in order] + [[]]
        gshard, held, saved, loss, x = [None] * U, {}, {}, None, None
        for j, (ph, u, mb) in enumerate(order):
            if self.stage == 3:
                self.materialise(run, needs[j], needs[j + 1], ph)
            if ph == "f":
                x, handle = run.unit_forward(u, xs[mb] if u == 0 else x, ys[mb] if u == U - 1 else None)
                if u >= self.lowest:   # below it no backward runs
                    saved[u] = handle
                if u == U - 1:   # the loss's backward starts from the seed (fp16), else from 1
                    loss, x = (x if loss is None else loss + x), seed
            else:
                x, grads = run.unit_backward(u, saved.pop(u), x)
                self._reduce(run, u, dict(zip(self.uses[u], grads)), held, gshard)
            if self.stage == 3:
                self.release(run, needs[j + 1])
        assert not held, f"borrowed gradients {sorted(held)} were never reduced"
        norm = self._update(gshard, lr, scale)
        # fp16's skipped step left the shards as the model holds them: nothing to publish
        if self.stage == 2 and (scale is None or math.isfinite(norm)):
            self.publish(run)
        return loss, norm

    def _reduce(self, run, u: int, grads: dict, held: dict, gshard: list) -> None:
        """Unit u's gradients: borrowed ones held for their owner, owned ones (plus what the
        borrowers held for them) reduce-scattered now; this rank's shard summed over micro-batches."""
        for n in self.borrowed[u]:
            held[n] = grads[n] if n not in held else held[n] + grads[n]
        own = [grads[n] + held.pop(n) if n in held else grads[n] for n in self.owned[u]]
        if not own:   # a unit with nothing to train (LoRA): its backward only carried dx down
            return
        if u in self.defer:   # summed whole over the micro-batches: reduced in finish_stage
            acc = self.deferred.get(u)
            self.deferred[u] = own if acc is None else [a + b for a, b in zip(acc, own)]
            return
        self._scatter(run, u, own, gshard)

    def _scatter(self, run, u: int, own: list, gshard: list) -> None:
        """Unit u's owned gradients joined, padded, reduce-scattered; this rank's shard summed."""
        # a backend's grad_flat may write into a buffer it reuses per unit: only where the
        # reduce-scatter makes a vector of its own (k > 1), since alone `g` is `flat` and is kept
        join = getattr(run, "grad_flat", None) if self.k > 1 else None
        flat = self.layouts[u].pad((join or run.concat_flat)(own), self.k, self.ops)
        g = flat if self.k == 1 else self.comm.reducescatter(flat, op="average", name="zero.grads",
                                                              compression=self.agg.compression)
        gshard[u] = g if gshard[u] is None else gshard[u] + g

    def _update(self, gshard: list, lr: float, scale: float | None = None, overflow: bool = False) -> float:
        """Global norm over the shards, clipping, AdamW on this rank's shard; returns the norm.
        `gshard`, each unit's gradient shard, is emptied once joined: no reference but `g` stays
        (an argument lives on in its caller's frame), so clipping's scaled copy replaces the
        gradient rather than joining it and the pieces: one gradient shard alive, not three.
        `scale` (fp16): the gradients are the loss scale times the true ones; the norm is divided
        by it, and where it is not finite nothing is updated (the shards, AdamW's moments and
        step count stay). That norm is summed over dp, tp and the pipeline before it is read, so
        an overflow on any rank skips the step on every rank. `overflow`: the testing aid makes
        this rank's gradient shard overflow (a pipeline stage whose backward the seed missed)."""
        ops = self.ops
        g = ops.concat([gshard[u] for u in self.active])
        gshard.clear()
        if overflow:
            g = ops.scale(g, float("inf"))
        sq = self.sqnorms(g, [self.spans["sharded"], self.spans["replicated"]])
        if self.k > 1:
            sq = self.comm.allreduce(sq, op="sum", name="zero.norm")
        sharded = sq[0] if self.tp is None else self.tp.allreduce(sq[:1], op="sum", name="zero.norm.tp")[0]
        total = sharded + sq[1]
        if self.pp_sum is not None:   # the pipeline's sum is an MPI float: the one scalar read here
            total = self.pp_sum(float(total))
        if self.offload == "optimizer":   # the update runs on the host: the norm is read here
            total = float(total)
        norm = math.sqrt(total) if isinstance(total, float) else ops.sqrt(total)
        if scale is not None:   # fp16: the true gradients' norm (read here: the skip is decided on the host)
            norm = norm / scale
            if not math.isfinite(float(norm)):
                return float(norm)
        coef = clip_coef(norm, self.optim_cfg.grad_clip, min if isinstance(total, float) else ops.minimum)
        if scale is not None:   # unscaled within the clip factor: one pass over the shard
            coef = coef / scale
        if self.offload == "optimizer":   # the update runs on the host
            g_host = ops.to_host(g).astype(np.float32)
            g_host *= np.float32(coef)
            self.opt.step(self.p_host, g_host, lr)
            self.p = ops.from_host(self.p_host)
            return norm
        if not (isinstance(coef, float) and coef == 1.0):   # g is concat's own: in place where ops can
            g = getattr(ops, "scale_", ops.scale)(g, coef)
        self.p = self.opt.step(self.p, g, lr)
        return float(norm)

    # one unit at a time, as a pipeline's schedule calls for them (ShardedStageBase) ----------
    # Stage 3 gathers a unit for each micro-batch's forward and again for its backward, and
    # frees it after each: the schedule interleaves micro-batches and chunks, so keeping a unit
    # across them would hold the stage's whole weights (1F1B keeps up to p micro-batches in
    # flight). The trade: 2 allgathers per unit per micro-batch for 1 unit's weights held.
    # No gather ahead (gather_async): the next unit is known only to the schedule.
    def begin_stage(self) -> None:
        """A step's start: no gradient shard yet."""
        self.gshard, self.held, self.deferred = [None] * len(self.layouts), {}, {}

    def on_unit(self, run, j: int, phase: str, work):
        """work() with unit j's weights at hand: stage 3 gathers what it needs first and frees
        it after (phase: 'f', 'b' or 'e', materialise's)."""
        if self.stage == 3:
            self.materialise(run, self.needs[j], (), phase)
        out = work()
        if self.stage == 3:
            self.release(run, ())
        return out

    def stage_forward(self, run, j: int, x, target):
        """Unit j's forward (the runner's unit_forward) -> (output, handle)."""
        return self.on_unit(run, j, "f", lambda: run.unit_forward(self.ids[j], x, target))

    def stage_backward(self, run, j: int, handle, dy):
        """Unit j's backward; its gradients reduce-scattered (or deferred). -> d(input)."""
        def work():
            dx, grads = run.unit_backward(self.ids[j], handle, dy)
            self._reduce(run, j, dict(zip(self.uses[j], grads)), self.held, self.gshard)
            return dx
        return self.on_unit(run, j, "b", work)

    def finish_stage(self, run, lr: float, exchange=None, scale: float | None = None,
                     overflow: bool = False) -> float:
        """After the stage's last backward: each deferred unit's whole gradient, its tied names
        passed through `exchange(name, gradient)` (summed with the other stage's copy), then
        reduce-scattered; the norm over the pipeline, AdamW; stage 2 publishes. -> the norm.
        `scale`, `overflow`: fp16's (_update)."""
        for u, own in sorted(self.deferred.items()):
            own = [exchange(n, g) if exchange else g for n, g in zip(self.owned[u], own)]
            self._scatter(run, u, own, self.gshard)
        self.deferred = {}
        assert not self.held, f"borrowed gradients {sorted(self.held)} were never reduced"
        missing = [self.ids[u] for u, g in enumerate(self.gshard) if g is None]
        assert not missing, f"units {missing} got no gradient this step"
        norm = self._update(self.gshard, lr, scale, overflow)
        if self.stage == 2 and (scale is None or math.isfinite(norm)):
            self.publish(run)
        return norm

    def forward_only(self, run_unit, x, run):
        """Every unit's forward without gradients (evaluation, generation); stage 3 gathers each
        unit as the step does. `run_unit(u, x)` -> the unit's output."""
        U = len(self.layouts)
        for u in range(U):
            if self.stage == 3:
                self.materialise(run, self.needs[u], self.needs[u + 1] if u + 1 < U else [], "e")
            x = run_unit(u, x)
            if self.stage == 3:
                self.release(run, self.needs[u + 1] if u + 1 < U else [])
        return x

    # state: sizes, checkpoints (the host boundary) -------------------------------------------
    def state_bytes(self) -> int:
        """Optimizer-state bytes held on this rank (m and v of its shards, float32)."""
        return 2 * 4 * self.size

    def _pieces(self):
        """(name, [a, b) within the parameter, [s, e) within this rank's concatenated shards)
        for every parameter this rank's shards touch."""
        for u, lay in enumerate(self.layouts):
            lo, hi = lay.shard_range(self.k, self.i)
            for j, n in enumerate(lay.names):
                o, end = int(lay.offsets[j]), int(lay.offsets[j + 1])
                a, b = max(lo, o), min(hi, end)
                if a < b:
                    yield n, (a - o, b - o), (int(self.off[u]) + a - lo, int(self.off[u]) + b - lo)

    def _shape(self, n: str) -> tuple:
        return next(lay.shapes[n] for lay in self.layouts if n in lay.shapes)

    def _host_p(self) -> np.ndarray:
        return self.p_host.copy() if self.p_host is not None else self.ops.to_host(self.p)

    def shard_state(self, bases: dict | None = None) -> tuple[dict, dict]:
        """This rank's part of a sharded checkpoint, with no communication: the ranges of every
        parameter and both moments its shards hold, as ranged pieces of the tp slice at
        bases[name] (None: the whole array); dp rank 0 adds optim.step."""
        bases = bases or {}
        st, p = self.opt.state(), self._host_p()
        out = {"optim.step": np.array(st["t"], np.int64)} if self.i == 0 else {}
        where = {"optim.step": None} if self.i == 0 else {}
        for n, (a, b), (s, e) in self._pieces():
            pl = placement.ranged(bases.get(n), a, b, self._shape(n))
            for key, vec in ((n, p), (f"optim.m.{n}", st["m"]), (f"optim.v.{n}", st["v"])):
                out[key] = np.array(vec[s:e], np.float32)
                where[key] = pl
        return out, where

    def load(self, state, bases: dict | None = None) -> int:
        """This rank's ranges of the parameters, and of the moments when `state` has them, from
        whole arrays or a checkpoint.Sharded (read straight from a file saved at the same
        layout, else cut from the whole array one parameter at a time). Returns optim.step (0
        when the state holds no optimizer: parameters only)."""
        bases = bases or {}
        first = self.layouts[self.lowest].names[0]
        t = int(state.get("optim.step", 0)) if f"optim.m.{first}" in state else 0
        bufs = {kind: np.zeros(self.size, np.float32) for kind in (("p", "m", "v") if t else ("p",))}
        for n, (a, b), (s, e) in self._pieces():
            pl = placement.ranged(bases.get(n), a, b, self._shape(n))
            for kind, buf in bufs.items():
                key = n if kind == "p" else f"optim.{kind}.{n}"
                buf[s:e] = state.slice(key, pl) if hasattr(state, "slice") else \
                    placement.take(np.asarray(state[key], np.float32), pl)
        self._set_shard(self.ops.from_host(bufs["p"]))
        if t:
            self.opt.load(bufs["m"], bufs["v"], t)
        else:
            self.opt.load(np.zeros(self.size, np.float32), np.zeros(self.size, np.float32), 0)
        return t

    def _gather_named(self, vec_host: np.ndarray, what: str) -> dict[str, np.ndarray]:
        """{name: whole tp-local array} from every rank's concatenated shards (collective)."""
        full = self.comm.allgather(self.ops.from_host(vec_host), name=f"zero.state.{what}") if self.k > 1 \
            else self.ops.from_host(vec_host)
        full = self.ops.to_host(full)
        out = {}
        for u in self.active:
            lay = self.layouts[u]
            a, b = int(self.off[u]), int(self.off[u + 1])
            flat = np.concatenate([full[r * self.size + a:r * self.size + b] for r in range(self.k)])
            out.update({n: arr.copy() for n, arr in lay.unflatten(flat[:lay.total]).items()})
        return out

    def unit_host(self, u: int) -> dict[str, np.ndarray]:
        """Unit u's whole (tp-local) parameters on the host (collective over the dp group): one
        unit's allgather, so a caller that walks the units (role snapshots) never holds more
        than one unit on the device."""
        shard = self.unit_shard(u)
        full = self.comm.allgather(shard, name="zero.unit_params") if self.k > 1 else shard
        lay = self.layouts[u]
        return {n: a.copy() for n, a in lay.unflatten(self.ops.to_host(full)[:lay.total]).items()}

    def host_params(self) -> dict[str, np.ndarray]:
        """The whole (tp-local) parameters on the host (collective over the dp group)."""
        return self._gather_named(self._host_p(), "params")

    def moments(self) -> dict[str, np.ndarray]:
        """The whole moments, 'optim.m.<name>', 'optim.v.<name>', 'optim.step' (collective)."""
        st = self.opt.state()
        out = {f"optim.m.{n}": a for n, a in self._gather_named(np.asarray(st["m"]), "m").items()}
        out.update({f"optim.v.{n}": a for n, a in self._gather_named(np.asarray(st["v"]), "v").items()})
        out["optim.step"] = np.array(st["t"], np.int64)
        return out


class ShardedEngineBase(GPTEngineBase):
    """The built-in GPT under ZeRO-2 / ZeRO-3 (parallel.zero = 2 / 3), for both backends'
    ShardedEngine. Backend primitives beyond GPTEngineBase's: the Runner above (unit_forward,
    unit_backward, load_unit, free_unit; concat_flat), `micro(x, y)` (the step's batch on the
    device, split into aggregation.accumulation micro-batches: from_host twice),
    `eval_unit(u, x)` (a unit's forward without gradients), `score(logits, y)` ((loss sum,
    correct, tokens) of host targets), `tokens(ids)` (an int batch on the device),
    `shape_of(name)`, and optionally `gather_async` and `sqnorms` (ZeroSharded's)."""

    gather_async = None
    ahead = None     # a GatherAhead behind gather_async (TensorFlow): its thread is stopped by close()
    sqnorms = None
    head = None   # classify's Classifier (the backends' ShardedEngine sets it; pipeline stages do not)

    def _groups(self, cfg, layout, collectives, tp, host_collectives) -> None:
        """The dp group (tensor Collectives and their HostCollectives), the tp group (None
        without tensor parallelism)."""
        self.cfg, self.layout, self.k = cfg, layout, cfg.aggregation.accumulation
        self.comm, self.ncomm = collectives, host_collectives(collectives)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.tp_ncomm = host_collectives(self.tp.coll) if self.tp else None

    def _shard_model(self, layers=None, **stage) -> None:
        """After the backend built the model (self.named, self.comm, self.ncomm, self.tp):
        check that every rank built the same model, rank 0's weights to all, this rank's shards
        (stage 3: the whole weights freed), the memory log. `layers`, `stage`: a pipeline
        stage's units and ZeroSharded's pipeline arguments (ShardedStageBase)."""
        cfg = self.cfg
        par = cfg.parallel
        self._agree_on_model()
        if cfg.train.precision == "fp16":   # dynamic loss scaling (loss_scale.py), per step in ZeroSharded
            from ..loss_scale import LossScaler
            self.scaler = LossScaler()
        fresh = par.zero == 3 and not self.lora   # stage 3 built no weights: its units come from _unit_flats
        if not fresh:
            self._broadcast_parameters()
        self.steps_done = 0
        ids, (uses, self.owned) = self._units(layers)
        self.uses = dict(zip(ids, uses))   # the runner's, by the model's layer index
        shapes = {n: tuple(self.shape_of(n)) for n, _ in self.named}
        tp_args = {} if self.tp is None else {"tp": self.tp.coll, "kind": tp_plan.norm_kind}
        self.zero = ZeroSharded(uses, self.owned, shapes, self.comm, cfg.optim, cfg.aggregation, par.zero,
                                gather_async=self.gather_async, offload=par.offload, sqnorms=self.sqnorms,
                                ids=ids, **{**tp_args, **stage})
        if fresh:
            self.zero.init_params(self._unit_flats())
        else:
            by_name = dict(self.named)
            self.zero.init_params([self.concat_flat([by_name[n] for n in names]) if names else None
                                   for names in self.owned])
            if par.zero == 3:   # LoRA: the adapters built with values; only their shards stay
                for u in self.zero.active:
                    self.free_unit(self.owned[u])
        self._log_memory()

    def _units(self, layers=None):
        """(unit ids, (uses, owned) per unit): the built-in GPT's layers, or a pipeline stage's
        `layers` (a user's layer list: zero_layers.py)."""
        ids = list(range(params.n_layers(self.cfg.model))) if layers is None else list(layers)
        return ids, units_for(self.cfg, ids)

    def _unit_flats(self):
        """ZeRO-3's start-up: unit_values on the device, rank 0's sent to the dp group (as
        _broadcast_parameters sends the whole model: ranks agree whatever they drew)."""
        for flat in unit_values(task.model_config(self.cfg), self.cfg.train.seed, self.owned, self.model.cut):
            flat = self.from_host(flat)
            if self.comm.size > 1:
                flat = self.comm.broadcast(flat, root=0, name="init.unit")
            yield flat

    def local_shapes(self) -> dict[str, tuple]:
        """This rank's (tp-local) shape of every parameter of the model."""
        shapes = params.param_shapes(task.model_config(self.cfg))   # a classifier's head too
        return tp_plan.local_shapes(shapes, self.tp.size) if self.tp else shapes

    def _agree_on_model(self) -> None:
        """Every dp rank built the same model (units, shapes): a rank that differs gets an error
        naming the ranks, on every rank, before any collective whose shapes would disagree."""
        from ..errors import HvdllmError
        if self.comm.size == 1:
            return
        import zlib
        shapes = [(n, tuple(self.shape_of(n))) for n, _ in self.named]
        sig = np.array([len(shapes), sum(math.prod(s) for _, s in shapes), zlib.crc32(repr(shapes).encode())],
                       np.int64)
        every = self.ncomm.allgather(sig[None], name="zero.model_check")
        differ = [r for r in range(len(every)) if not np.array_equal(every[r], every[0])]
        if differ:
            raise HvdllmError(
                f"parallel.zero={self.cfg.parallel.zero}: the dp ranks built different models: rank 0 has "
                f"{every[0][0]} parameters tensors with {every[0][1]} elements, "
                + "; ".join(f"rank {r} {every[r][0]} with {every[r][1]}" for r in differ)
                + " (or the same counts in other shapes). Every rank must run the same model.* settings.")

    def _log_memory(self) -> None:
        """Rank 0 (in a pipeline each stage's first rank): bytes this rank holds of parameters,
        gradients and optimizer state, beside the ZeRO paper's formula (hvdllm/memory.py)."""
        if self.layout.dp_rank != 0 or self.layout.tp_rank != 0:
            return
        z, par = self.zero, self.cfg.parallel
        psi = sum(lay.total for lay in z.layouts)
        unit = max(lay.total for lay in z.layouts)
        # units gathered ahead only with gather_async (none in a pipeline stage, beside tp or
        # alone); a stage keeps its tied unit's gradient (memory.py)
        want = paper_bytes(psi, z.k, z.stage, par.offload, live_unit=unit,
                           prefetch=1 if z.gather_async is not None else 0)
        want["live"] += 4 * sum(z.layouts[u].total for u in z.defer)
        have = {"params": z.param_bytes(), "grads": 4 * z.size, "optimizer": z.state_bytes()}
        where = f"pipeline stage {self.layout.pp_rank}, " if self.layout.pp > 1 else ""
        print(f"[hvdllm] {where}zero={z.stage} dp={z.k} offload={par.offload}: this rank holds "
              + ", ".join(f"{k} {v} B (paper {want[k]} B)" for k, v in have.items())
              + f"; live units up to {want['live']} B; {'host' if want['host'] else 'device'} optimizer",
              file=sys.stderr)

    def num_params(self) -> int:
        """Parameters of this rank's model part (whole, as the other engines count them)."""
        return sum(lay.total for lay in self.zero.layouts)

    # training --------------------------------------------------------------------------------
    def train_step(self, x, y, lr):
        from ..engine import StepResult
        xs, ys = self.micro(x, y)
        self.steps_done += 1
        try:
            if self.scaler is None:
                loss, norm = self.zero.step(self, xs, ys, lr)
            else:   # fp16: the backward from this rank's scale (the testing aid's inf where it overflows)
                seed = self._step_scale()
                loss, norm = self.zero.step(self, xs, ys, lr, scale=self.scaler.scale, seed=seed)
        except BaseException:   # the job ends on this error: no gather is issued ahead any more
            self.close()
            raise
        if self.comm.size > 1:
            loss = self.comm.allreduce(loss, op="average", name="loss")
        skipped = self.scaler is not None and not math.isfinite(norm)   # the job-wide norm: every rank alike
        if self.scaler is not None:
            self.scaler.update(not skipped)
        return StepResult(loss=float(loss), grad_norm=float(norm), skipped=skipped)

    def logits(self, ids):
        return self.zero.forward_only(self.eval_unit, self.tokens(ids), self)

    def evaluate(self, x, y):
        from ..engine import EvalResult
        loss_sum, correct, n = self.score(self.logits(x), y)
        return EvalResult(float(loss_sum), int(correct), int(n))

    def close(self) -> None:
        """End of training: the gather thread (if any) stopped."""
        if self.ahead is not None:
            self.ahead.close()

    def local_gradients(self, x, y):
        # config validation refuses ps.servers with parallel.zero; this guards direct engine use
        raise ConfigError("parallel.zero >= 2 reduces its gradients per unit; parameter servers "
                          "need parallel.zero <= 1")

    # state (collective over the dp group; under tp over the tp group too) --------------------
    def host_params(self) -> dict[str, np.ndarray]:
        """Stage 2: the model's own whole parameters (no communication: role snapshots read them
        on rank 0 alone); stage 3: gathered over the dp group (collective)."""
        if self.zero.stage == 2:
            return GPTEngineBase.host_params(self)
        return self.zero.host_params()

    def unit_params(self):
        """Each unit's whole parameters on the host, {name: array}, one unit at a time
        (collective over the dp group, and the tp group's slices gathered): ZeRO-3's role
        snapshots (strategies/roles.py), assembled on rank 0 from every dp rank's shards."""
        for u in range(len(self.zero.layouts)):
            yield gather_full(self.zero.unit_host(u), self.tp_ncomm)

    def flat_params(self) -> np.ndarray:
        hp = self.host_params()
        return np.concatenate([hp[n].reshape(-1) for n, _ in self.named])

    def _bases(self) -> dict:
        if self.tp is None:
            return {}
        return {n: tp_plan.placement(n, len(self.shape_of(n)), self.tp.size, self.tp.rank) for n, _ in self.named}

    def shard_state(self):
        """This rank's ranges of the parameters and moments (nothing gathered)."""
        return self.zero.shard_state(self._bases())

    def load_state_dict(self, state) -> None:
        """From whole arrays or a checkpoint.Sharded: only this rank's ranges are read; stage 2
        then allgathers the whole parameters into the model."""
        self.zero.release_all(self)
        if self.lora:   # the frozen base into the model; a fresh start's adapters keep their values
            state = self._load_frozen_base(state, self.zero.host_params())
        self.steps_done = self.zero.load(state, self._bases())
        if self.zero.stage == 2:
            self.zero.publish(self)

    def state_dict(self) -> dict[str, np.ndarray]:
        local = self.host_params()
        local.update(self.zero.moments())
        return gather_full(local, self.tp_ncomm)


class ShardedStageBase(ShardedEngineBase, PipelineStageBase):
    """A pipeline stage of the built-in GPT under ZeRO-2 / ZeRO-3 (parallel.pp > 1, parallel.zero
    >= 2), for both backends' ShardedPipelineEngine: the stage's units (its layers) sharded over
    its dp group, as ShardedEngineBase shards the whole model's. The schedule (pipeline.py) calls
    forward / backward per (chunk, micro-batch); each runs the chunk's units one at a time
    (ZeroSharded.stage_forward / stage_backward: stage 3 gathers each for it), each unit's
    gradients reduce-scattered as its backward makes them, summed over the micro-batches.

    The tied `wte` (first stage's embeddings, last stage's head: each stage's unit owns its copy)
    keeps the unsharded pipeline's numbers: the unit holding it keeps its gradient whole over the
    step (one unit's gradient more on those two stages: memory.rank_memory counts it), and at
    the step's end the two stages sum their wte gradients (pipeline.sum_with_peer, the exchange
    the unsharded stages make) before that unit's reduce-scatter; identical shards on both
    stages then take identical AdamW steps. The norm counts wte once (skipped on the last stage)
    and sums the stages over the pipeline. Backend primitives beyond ShardedEngineBase's:
    `stage_input(a)` (an activation or its gradient from the pipeline, on the device),
    `stage_output(t)` (what goes to the next stage) and `loss_value(t)` (the loss the Pipeline
    sums: a float or a float64 0-d tensor)."""

    train_step = PipelineStageBase.train_step
    evaluate = PipelineStageBase.evaluate
    generate = PipelineStageBase.generate

    def _stage_strategies(self, collectives, host_collectives) -> None:
        """The dp group, the schedule, the tied-embedding peer, this stage's ZeroSharded."""
        cfg, layout = self.cfg, self.layout
        self.tp_ncomm = host_collectives(self.tp.coll) if self.tp else None
        self.comm, self.ncomm = collectives, host_collectives(collectives)
        self.k = self.m   # the runner's loss is divided by the micro-batches, as the Pipeline's
        self.pipe = pl.Pipeline(self.pp_comm, layout.pp, layout.pp_rank, self.m, cfg.parallel.virtual_stages,
                                cfg.parallel.schedule, self.timeout)
        # (a classifier's head is cls.*, not the tied wte: as the unsharded stages, no peer)
        self.tied_peer = pl.tied_peer(layout.pp, self.model.layers, cfg.model.n_layer) \
            if params.tied(cfg.model) and not task.is_classify(cfg) else None
        self.saved, self.opt = {}, None

        def kind(n):   # the last stage's wte is the first stage's, counted there
            if n == "wte" and self.tied_peer == 0:
                return "skip"
            return tp_plan.norm_kind(n) if self.tp else "sharded"
        layers = list(self.model.layers)
        tied = [j for j, i in enumerate(layers) if "wte" in params.layer_params(cfg.model, i)] \
            if self.tied_peer is not None else []
        self._shard_model(layers, kind=kind, defer=tied, pp_sum=lambda x: pl.allreduce_sum(
            self.pp_comm, x, self.timeout, "pipeline grad-norm allreduce"))
        self.index = {u: j for j, u in enumerate(layers)}

    def start_step(self) -> None:
        self.zero.begin_stage()

    # StageRunner (strategies/pipeline.py) ----------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        layers, handles = self.chunks[chunk], []
        x = self.tokens(inp) if layers[0] == 0 else self.stage_input(inp)
        for u in layers:
            last = target is not None and u == layers[-1]
            x, h = self.zero.stage_forward(self, self.index[u], x, self.tokens(target) if last else None)
            handles.append(h)
        self.saved[(mb, chunk)] = handles
        if target is None:
            return self.stage_output(x)
        return self.loss_value(x) * self.m   # the runner's loss / m; the Pipeline divides by m

    def backward(self, chunk, mb, grad):
        layers, handles = self.chunks[chunk], self.saved.pop((mb, chunk))
        # the last chunk's loss: fp16 starts its backward from the scaler's scale, the same on
        # every stage (the testing aid's overflow enters at reduce_and_step, as the unsharded
        # pipeline's does, so another stage skips on the pipeline's norm alone)
        seed = None if self.scaler is None else self.scaler.scale
        dy = seed if grad is None else self.stage_input(grad)
        for u, h in zip(reversed(layers), reversed(handles)):
            dy = self.zero.stage_backward(self, self.index[u], h, dy)
        return None if layers[0] == 0 else self.stage_output(dy)

    def reduce_and_step(self, lr: float) -> float:
        def exchange(n, g):   # the tied wte: both stages' gradients summed (as the unsharded step)
            if n != "wte":
                return g
            return self.from_host(pl.sum_with_peer(self.pp_comm, self.tied_peer, self.to_host(g), self.timeout))
        scale = None if self.scaler is None else self.scaler.scale
        return self.zero.finish_stage(self, lr, exchange if self.tied_peer is not None else None, scale=scale,
                                      overflow=self.scaler is not None and self.scale != scale)

    # evaluation, state ------------------------------------------------------------------------
    def forward_chunk(self, chunk, a) -> np.ndarray:
        """The chunk's layers but a classifier's head (PipelineStageBase._place's body: its
        pooling reads the lengths, so the backend's `score` runs it, in head_scores)."""
        x = self.tokens(a) if self.chunks[chunk][0] == 0 else self.stage_input(a)
        for u in self.body[chunk]:
            x = self.zero.on_unit(self, self.index[u], "e", lambda: self.eval_unit(u, x))
        return self.to_host(x)

    def head_scores(self, work):
        """work() (the backend's classifier scoring on the last stage) with the head unit's
        weights at hand: stage 3 gathers them for it."""
        return self.zero.on_unit(self, self.index[self.cfg.model.n_layer + 1], "e", work)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole parameters and moments on the first stage (the others get their own)."""
        return self._to_first_stage(ShardedEngineBase.state_dict(self))
