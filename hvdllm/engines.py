"""What every engine does alike, written once against a few backend primitives.

A backend's engine classes (torch_backend/, tf_backend/: Engine, PipelineEngine,
SequentialEngine) inherit from these and keep only what truly differs: the model, autograd and
the framework's calls. The primitives each backend supplies:

    named                     [(name, tensor)] this rank's parameters (hvdllm.params order)
    to_host(t) -> ndarray     the named host boundary (checkpoints, parameter servers, metrics,
    from_host(ndarray) -> t   the step's input batch, pipeline activations)
    assign(t, ndarray)        write a host array into a parameter
    concat_flat(tensors) / assign_flat(tensors, flat)
                              one flat vector on the device, and back (ZeRO-1, local SGD)
    optimizer_state() / load_optimizer_state(state, step)
                              the framework optimizer's moments as 'optim.m.<name>' /
                              'optim.v.<name>' / 'optim.step' (unsharded engines only)
    last_logits(ids)          float64 logits of the last position (generation)
    comm, ncomm               Collectives over the dp group (on the backend's tensors), and
                              HostCollectives over it (numpy: metrics, checkpoints)
    comm.ops                  the array primitives of the backend's flat vectors (hvdllm/flat.py
                              NumpyOps lists them: zeros, concat, sqnorms, sqrt, minimum, scale,
                              from_host / to_host), so the core's flat strategies run on them

The device seam (what crosses to the host per training step; tests/parallel/check_transfers.py
counts every to_host / from_host and holds each layout to it). Tensors stay the backend's own
through a step: the gradients, their reduction, clipping and the update. The core's flat
strategies, ZeRO-1 (strategies/zero.py, its AdamW shard: optim.DeviceAdamW) and local SGD
(strategies/local_sgd.py), run on the backend's flat tensors through its tensor Collectives and
`comm.ops`, never on numpy. So per step: from_host = the input batch (x and y: 2), to_host = 0,
for dp, ZeRO-1, local SGD (sync steps and the others alike) and tp; the logged scalars (the loss,
the gradient norm) are read as Python floats. A pipeline adds its activations and gradients
between stages and the tied-embedding exchange (p2p over MPI's host buffers), a fixed number per
micro-batch, never one per parameter. Host copies otherwise only at named boundaries:
checkpoints (state_dict, shard_state, load_state_dict; Zero1.shard_state / load_shard / moments /
gather_state; LocalSGD.state / load), parameter servers (flat_params / flat_grads /
set_flat_params: their servers run numpy), role-rank snapshots and metrics.

State layout (checkpoint.py, placement.py): parameters under their names plus their AdamW moments;
under tensor parallelism each rank holds slices (tp_plan.placements say where); under ZeRO-1 each
dp rank holds a range of the moments (zero.py); in a pipeline each stage holds its layers.
"""
from __future__ import annotations

import math

import numpy as np

from . import aggregation, lora, params, sampling, task
from .flat import NUMPY
from .strategies import pipeline as pl
from .strategies import tensor_parallel as tp_plan


class HostCollectives:
    """A backend's Collectives on host numpy arrays, for what is host-side anyway: metrics, the
    stop agreement, role-rank snapshots, tp gathers for checkpoints. Every call is one host ->
    device -> host round trip, counted by the backend's to_host / from_host. (The core's flat
    strategies, ZeRO-1 and local SGD, take the backend's tensor Collectives instead; they run
    on these too, on numpy, which is what `ops` says.)"""

    ops = NUMPY

    def __init__(self, coll, from_host, to_host):
        self.coll, self._in, self._out = coll, from_host, to_host

    @property
    def rank(self) -> int:
        return self.coll.rank

    @property
    def size(self) -> int:
        return self.coll.size

    def allreduce(self, a, op="average", name=None, compression="none"):
        return self._out(self.coll.allreduce(self._in(a), op=op, name=name, compression=compression))

    def reducescatter(self, a, op="average", name=None, compression="none"):
        return self._out(self.coll.reducescatter(self._in(a), op=op, name=name, compression=compression))

    def allgather(self, a, name=None):
        return self._out(self.coll.allgather(self._in(a), name=name))

    def broadcast(self, a, root=0, name=None):
        return self._out(self.coll.broadcast(self._in(a), root=root, name=name))


def gather_full(named_arrays: dict, tp_ncomm) -> dict:
    """{name: this tp rank's slice} -> {name: whole array} (numpy; collective over the tp group,
    whose HostCollectives is `tp_ncomm`; None: no tensor parallelism)."""
    if tp_ncomm is None:
        return {n: np.asarray(a) for n, a in named_arrays.items()}
    out = {}
    for n, a in named_arrays.items():
        if tp_plan.style(n) == "replicate":
            out[n] = np.asarray(a)
            continue
        stacked = tp_ncomm.allgather(np.ascontiguousarray(a)[None], name=f"tp.gather.{n}")
        out[n] = tp_plan.unshard(n, list(stacked))
    return out


class EngineBase:
    """Traits (declared; the trainer reads them, never probes) and the members every engine
    implements the same way."""

    lockstep = True       # every trainer steps together (False: async parameter-server workers)
    max_steps = None      # None: train.steps; async workers: the servers' shared budget
    zero = None           # hvdllm.strategies.zero.Zero1 when parallel.zero = 1
    scaler = None         # hvdllm.loss_scale.LossScaler when train.precision = 'fp16'
    inject_overflow = False   # testing aid (train.fail_mode = 'overflow'): this step's gradients overflow
    local = None          # hvdllm.strategies.local_sgd.LocalSGD when localsgd.every > 0

    def _step_scale(self) -> float:
        """This step's loss scale (train.precision = 'fp16'; 1 otherwise): the scaler's, or an
        infinite one where the testing aid makes this rank's gradients overflow."""
        if self.scaler is None:
            return 1.0
        self.scale = float("inf") if self.inject_overflow else self.scaler.scale
        self.inject_overflow = False
        return self.scale

    def host_params(self) -> dict[str, np.ndarray]:
        """This rank's parameters as host copies (they outlive the next update)."""
        return {n: np.array(self.to_host(p)) for n, p in self.named}

    def num_params(self) -> int:
        return sum(int(np.prod(tuple(p.shape))) for _, p in self.named)

    def allreduce_sum(self, values) -> np.ndarray:
        """A small float64 vector summed over the dp group (evaluation metrics)."""
        return self.ncomm.allreduce(np.asarray(values, dtype=np.float64), op="sum", name="metrics")

    def optimizer_state_bytes(self) -> int:
        if self.zero is not None:
            return self.zero.state_bytes()
        return sum(a.nbytes for k, a in self.optimizer_state().items() if k != "optim.step")

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0) -> list[int]:
        """hvdllm.sampling on `last_logits` (shared with every engine and both backends: equal
        logits give equal tokens)."""
        return sampling.generate(self.last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)

    def close(self) -> None:
        """End of training (parameter-server workers end the servers here)."""


class GPTEngineBase(EngineBase):
    """State of the built-in GPT under dp / tp / pp / ZeRO-1 / local SGD, for Engine and
    PipelineEngine alike. Extra attributes: `tp` (TPGroup or None), `tp_ncomm`, `flat`
    (FlatLayout of this rank's parameters), `pp_comm` (None outside a pipeline)."""

    pp_comm = None
    tp = None
    tp_ncomm = None
    # finetune.lora_rank > 0 (hvdllm/lora.py): True, `named` is the trainable set (adapters, a
    # classifier's head) and `base_named` every model parameter, the frozen ones included
    lora = False

    @property
    def param_shapes(self) -> dict[str, tuple]:
        """The whole model's parameter shapes (what a checkpoint must match); under LoRA the
        trainable set's, which is all a checkpoint holds."""
        if self.lora:
            return lora.trainable_shapes(self.cfg)
        return params.param_shapes(task.model_config(self.cfg))   # a classifier's head too

    def _broadcast_parameters(self) -> None:
        """Rank 0's initial weights win, in one message: ranks agree even if their seeds or files
        differed (one message, not one per parameter: a TF collective is a traced function per
        call site, and one per parameter retraced on every call)."""
        if self.comm.size == 1:
            return
        tensors = [p for _, p in self.named]
        self.assign_flat(tensors, self.comm.broadcast(self.concat_flat(tensors), root=0, name="init.params"))

    # flat vectors on the device, for the core's flat strategies (ZeRO-1, local SGD): no host
    # transfer (the backend concatenates and splits on its device) ----------------------------
    def device_flat_params(self):
        return self.concat_flat([p for _, p in self.named])

    def set_device_flat_params(self, flat) -> None:
        self.assign_flat([p for _, p in self.named], flat)

    # ... and their host copies, for parameter servers and role-rank snapshots (numpy on the
    # other side): one host transfer per vector, never one per parameter ------------------------
    def flat_params(self) -> np.ndarray:
        return self.to_host(self.device_flat_params())

    def flat_grads(self, grads) -> np.ndarray:
        return self.to_host(self.concat_flat(grads))

    def set_flat_params(self, flat: np.ndarray) -> None:
        self.set_device_flat_params(self.from_host(np.ascontiguousarray(flat, np.float32)))

    # state (collective under ZeRO-1, tp and pp: every rank of the group calls it) -----------
    def _to_first_stage(self, local: dict) -> dict:
        if self.pp_comm is None:
            return local
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.layout.pp, local, self.timeout)

    def _local_state(self) -> dict[str, np.ndarray]:
        out = self.host_params()
        if self.zero is not None:   # the whole moments: gathered over the dp group
            out.update(self.zero.moments())
        else:
            out.update(self.optimizer_state())
        if self.local is not None:
            out.update(self.local.state())
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole (unsharded) parameters and AdamW moments, loadable under any layout; in a
        pipeline on its first stage (the others get their own part back)."""
        return self._to_first_stage(gather_full(self._local_state(), self.tp_ncomm))

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole parameters without optimizer state (tp slices gathered, stages sent to the
        first): the snapshots trainers offer evaluators and generators (strategies/roles.py)."""
        return self._to_first_stage(gather_full(self.host_params(), self.tp_ncomm))

    def shard_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """This rank's part of a sharded checkpoint and where each array sits in the whole
        (checkpoint.py, placement.py): its tp slices; under ZeRO-1 the range of the moments it
        holds (nothing gathered)."""
        where = (lambda arrays: tp_plan.placements(arrays, self.tp.size, self.tp.rank)) if self.tp else None
        if self.zero is not None:
            host = self.host_params()
            return self.zero.shard_state(host, where(host) if where else None)
        local = self._local_state()
        return local, (where(local) if where else {})

    def load_state_dict(self, state) -> None:
        """From whole arrays (a dict) or a checkpoint.Sharded; a state without optim.* keys
        loads parameters only."""
        if self.lora:
            state = self._load_frozen_base(state)
        names = [n for n, _ in self.named]
        if self.tp is not None or self.pp_comm is not None:   # only this rank's slices
            keys = [*names, *(f"optim.{mv}.{n}" for mv in "mv" for n in names), "optim.step",
                    "localsgd.anchor", "localsgd.buf"]
            state = tp_plan.shard_state(state, self.tp.size if self.tp else 1, self.tp.rank if self.tp else 0,
                                        keys=keys)
        for n, p in self.named:
            self.assign(p, np.asarray(state[n], np.float32))
        step = int(state.get("optim.step", 0))
        self.steps_done = step
        if step == 0 or f"optim.m.{names[0]}" not in state:
            return
        if self.zero is not None:   # only this dp rank's range (straight from its file when it can)
            self.zero.load_shard(state, step)
        else:
            self.load_optimizer_state(state, step)
        if self.local is not None:
            self.local.load(state)


    def _load_frozen_base(self, state, current=None):
        """LoRA: the frozen parameters `state` holds (train.init_from's weights) go into the model;
        returns `state` with the trainable arrays it lacks (a fresh start's adapters, kept at
        their seeded values) added, for the common path to load. `current`: those values on the
        host where the model does not hold them (ZeRO-3's shards)."""
        trainable = {n for n, _ in self.named}
        for n, p in self.base_named:
            if n not in trainable and n in state:
                self.assign(p, np.asarray(state[n], np.float32))
        fresh = {n: np.array(current[n] if current is not None else self.to_host(p))
                 for n, p in self.named if n not in state}
        return task.FreshHead(state, fresh) if fresh else state


class PipelineStageBase(GPTEngineBase):
    """The built-in GPT as a pipeline stage: the step after the schedule's last backward, written
    once. Backend primitives beyond the base's: `stage_grads()` (gradients aligned with `named`,
    zeros where a parameter got none), `from_host(ndarray)`, `norm_sq(named_grads)` (float64
    squared norm, tp slices summed over the tp group), `apply_update(grads, coef, lr)` (scale by
    the clip factor, then AdamW)."""

    def _place(self, cfg, layout, rt, tp, measure) -> list[int]:
        """This rank's chunks of layers (parallel.partition; `measure` times the layers for
        'time'), its tp group; returns the layer indices this stage builds."""
        from mpi.groups import subcomms
        rt.require_mpi("pipeline parallelism (parallel.pp > 1)")
        self.cfg, self.layout, self.m = cfg, layout, cfg.parallel.microbatches
        p, v = layout.pp, cfg.parallel.virtual_stages
        # collective over COMM_WORLD: role ranks join it in strategies/roles.join_trainer_startup
        self.pp_comm = subcomms(rt.comm, layout, "pp")
        self.timeout = cfg.train.step_timeout
        self.ranges = pl.split_layers(cfg, rt, p * v, measure)
        self.chunks = pl.stage_chunks(self.ranges, p, v, layout.pp_rank)
        # the layers each chunk runs through the model: a classifier's head layer (L+1: final
        # norm, pooling, cls.*) needs the lengths, so the backend's Classifier runs it on the
        # last stage's hidden state instead
        head = cfg.model.n_layer + 1 if task.is_classify(cfg) else None
        self.body = [[i for i in c if i != head] for c in self.chunks]
        self.tp = tp if tp is not None and tp.size > 1 else None
        return sorted(i for c in self.chunks for i in c)

    def _strategies(self, collectives, host_collectives, make_adamw) -> None:
        """The dp group, the schedule, the tied-embedding peer, ZeRO-1 or the framework's AdamW."""
        cfg, layout = self.cfg, self.layout
        self.tp_ncomm = host_collectives(self.tp.coll) if self.tp else None
        self.comm = collectives
        self.ncomm = host_collectives(collectives)
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.pipe = pl.Pipeline(self.pp_comm, layout.pp, layout.pp_rank, self.m, cfg.parallel.virtual_stages,
                                cfg.parallel.schedule, self.timeout)
        # an untied head has its own lm_head, a classifier its cls.*: no wte copy on the last
        # stage to keep in step
        self.tied_peer = pl.tied_peer(layout.pp, self.model.layers, cfg.model.n_layer) \
            if params.tied(cfg.model) and not task.is_classify(cfg) else None
        self.zero = pl.make_zero(cfg, self) if cfg.parallel.zero else None
        self.opt = make_adamw() if self.zero is None else None
        if cfg.train.precision == "fp16":
            from .loss_scale import LossScaler
            self.scaler = LossScaler()

    def backward_loss(self, loss):
        """What the last stage's backward starts from: the micro-batch's share of the mean loss,
        times the loss scale under fp16 (the scaler's, the same on every stage)."""
        return loss / self.m if self.scaler is None else loss * (self.scaler.scale / self.m)

    def reduce_and_step(self, lr: float) -> float:
        """In this order: the tied-embedding gradient exchange between the first and last stage
        (p2p), then ZeRO-1's step (zero.py) or one grouped allreduce of the stage's gradients
        over its dp group; the squared norm summed over the pipeline (wte counted once); AdamW."""
        from .optim import clip_coef
        grads = self.stage_grads()
        names = [n for n, _ in self.named]
        scale = None if self.scaler is None else self.scaler.scale   # fp16: the same on every stage
        if self.scaler is not None and self.scale != scale:   # the testing aid: this rank's gradients overflow
            grads[0] = grads[0] * float("inf")
        if self.tied_peer is not None:
            i = names.index("wte")
            grads[i] = self.from_host(pl.sum_with_peer(self.pp_comm, self.tied_peer, self.to_host(grads[i]),
                                                       self.timeout))
        if self.zero is not None:   # reduce-scatter, this rank's AdamW shard, allgather
            new, norm = self.zero.step(self.concat_flat(grads), self.device_flat_params(), lr, scale=scale)
            if math.isfinite(norm):   # (fp16: the job-wide norm, so every rank skips alike)
                self.set_device_flat_params(new)
            return norm
        if self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, name="pp.grads", **self.reduce.kwargs())
        # wte is held twice (first and last stage); count it once in the global norm.
        mine = [(n, g) for n, g in zip(names, grads) if not (n == "wte" and self.tied_peer == 0)]
        norm = float(np.sqrt(pl.allreduce_sum(self.pp_comm, float(self.norm_sq(mine)), self.timeout,
                                              "pipeline grad-norm allreduce")))
        if scale is None:
            self.apply_update(grads, clip_coef(norm, self.cfg.optim.grad_clip), lr)
            return norm
        # fp16: summed over dp (the allreduce), tp and every stage (the pipeline's sum), an
        # overflow anywhere makes this norm non-finite on every rank of the job: all skip the step
        norm = norm / scale
        if math.isfinite(norm):
            self.apply_update(grads, clip_coef(norm, self.cfg.optim.grad_clip) / scale, lr)
        return norm

    def train_step(self, x, y, lr):
        from .engine import StepResult
        self.start_step()
        self._step_scale()   # fp16: the scale, or the testing aid's overflow on this rank
        norm = []
        loss = self.pipe.run(self, np.split(x, self.m), np.split(y, self.m),
                             lambda: norm.append(self.reduce_and_step(lr)))
        mean = self.ncomm.allreduce(np.array([loss], np.float64), op="average", name="pp.loss")
        skipped = self.scaler is not None and not math.isfinite(norm[0])
        if self.scaler is not None:
            self.scaler.update(not skipped)
        return StepResult(loss=float(mean[0]), grad_norm=norm[0], skipped=skipped)

    def evaluate(self, x, y):
        """Forward through the pipeline; the last stage scores, every stage reports its numbers
        (a classifier's logits too, which its distributed evaluation counts on every rank)."""
        from .engine import EvalResult
        out = self.pipe.forward_only(self.forward_chunk, x)
        k = self.cfg.task.num_labels if task.is_classify(self.cfg) else 0
        res = np.zeros(3 + len(x) * k)   # loss sum, correct, tokens (examples), then the logits
        if out is not None:
            res[:] = self.score(out, np.asarray(y))
        res = pl.bcast_from_last(self.pipe, res)
        logits = res[3:].reshape(len(x), k).astype(np.float32) if k else None   # float32 -> 64 -> 32: exact
        return EvalResult(float(res[0]), int(res[1]), int(res[2]), logits=logits)

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0):
        """Every stage calls it: the whole model is gathered to pipeline rank 0, which samples
        with a whole-model copy (`whole_model_logits(state)`); other stages return []."""
        state = self.state_dict()
        if self.layout.pp_rank != 0:
            return []
        return sampling.generate(self.whole_model_logits(state), prompt, max_new_tokens,
                                 self.cfg.model.block_size, temperature, top_k, seed)


class SequentialBase(EngineBase):
    """A user's layer list (hvdllm/user_model.py) under dp / pp / tp, for both backends' Sequential
    engines. Backend primitives beyond the base's: `_forward_all(x)` (logits on the last stage's
    owner, None elsewhere), `score(logits, y)`, `_local_state()`, `tp_allgather` (user_tp's
    allgather over the tp group); attributes `pipe`, `pp_comm`, `p`, `placements`, `param_shapes`."""

    pipe = None
    tp = None

    def _settings(self, cfg, layout) -> None:
        self.cfg, self.layout = cfg, layout
        self.p = layout.pp
        self.v = cfg.parallel.virtual_stages if self.p > 1 else 1
        # micro-batches: the pipeline's, or the accumulated ones of plain data parallelism
        self.m = cfg.parallel.microbatches if self.p > 1 else cfg.aggregation.accumulation
        self.timeout = cfg.train.step_timeout

    def _place_on_pipeline(self, rt, costs: list[float], measure) -> None:
        """Split the list over the pipeline (parallel.partition; `measure()` gives per-layer
        seconds for 'time'), and this rank's chunks; the whole list when pp = 1."""
        from .user_model import split
        n = len(costs)
        if self.p == 1:
            self.ranges, self.chunks, self.pp_comm, self.pipe = [(0, n)], [list(range(n))], None, None
            return
        from mpi.groups import subcomms
        par, stage = self.cfg.parallel, self.layout.pp_rank
        rt.require_mpi("pipeline parallelism (parallel.pp > 1)")
        self.pp_comm = subcomms(rt.comm, self.layout, "pp")
        self.ranges = split(costs, self.p * self.v, par.partition, rt, measure)
        self.chunks = pl.stage_chunks(self.ranges, self.p, self.v, stage)
        self.pipe = pl.Pipeline(self.pp_comm, self.p, stage, self.m, self.v, par.schedule, self.timeout)

    def _describe(self, n_layers: int) -> None:
        if self.layout.rank != 0:
            return
        import sys
        m, par = self.cfg.model, self.cfg.parallel
        sizes = [hi - lo for lo, hi in self.ranges]
        print(f"[hvdllm] model.layers={m.layers}: {n_layers} layers, "
              f"{sum(int(np.prod(s)) for s in self.param_shapes.values())} parameters"
              + (f", per pipeline part {sizes} ({par.partition})" if self.p > 1 else "")
              + (f", tp={self.layout.tp} ({m.tp_plan})" if self.tp is not None else ""), file=sys.stderr)

    def last_logits(self, ids) -> np.ndarray:
        """Under a pipeline every stage takes part (one forward through the pipeline per token,
        logits broadcast from the last stage), so every stage draws the same tokens."""
        out = self._forward_all(np.array([ids], dtype=np.int64))
        vec = np.zeros(self.cfg.model.vocab_size) if out is None else np.asarray(out[0, -1], np.float64)
        return pl.bcast_from_last(self.pipe, vec) if self.pipe is not None else vec

    def evaluate(self, x, y):
        from .engine import EvalResult
        out = self._forward_all(np.asarray(x, np.int64))
        res = np.zeros(3)
        if out is not None:
            res[:] = self.score(out, np.asarray(y, np.int64))
        if self.pipe is not None:
            res = pl.bcast_from_last(self.pipe, res)
        return EvalResult(float(res[0]), int(res[1]), int(res[2]))

    def state_dict(self) -> dict:
        """The whole model on pipeline rank 0 (collective over the tp group and the pipeline)."""
        from . import user_model
        local = self._local_state()
        if self.tp is not None:
            local = user_model.gather_whole(local, self.placements, self.tp_allgather(self.tp))
        if self.pipe is None:
            return local
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.p, local, self.timeout)

    def full_params(self) -> dict:
        return {k: a for k, a in self.state_dict().items() if not k.startswith("optim.")}

    def shard_state(self) -> tuple[dict, dict]:
        """This (stage, tp rank)'s arrays and the placement of each tp slice (checkpoint.py)."""
        return self._local_state(), self.placements
