"""The TensorFlow side of pipeline parallelism: this rank's model chunks, a GradientTape per
micro-batch (kept until that micro-batch's backward), and the optimizer step.

The schedule, the messages and their order are the core's (hvdllm/strategies/pipeline.py), the
same as torch_backend/pipeline.py: after the last backward, the tied-embedding gradient exchange
between the first and last pipeline ranks (p2p), one grouped allreduce of the gradients over this
stage's dp process set (Horovod), one allreduce of the squared gradient norm over the pipeline
(MPI) for global clipping; then AdamW. The loss is broadcast from the last stage.
"""
from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from hvdllm import aggregation, sampling
from hvdllm.engine import EvalResult, StepResult
from hvdllm.params import names_for_layers
from hvdllm.strategies import pipeline as pl
from hvdllm.strategies import tensor_parallel as tp_plan
from mpi.groups import subcomms

from .collectives import Collectives, NumpyCollectives
from .engine import AdamW
from .model import GPT
from .tensor_parallel import gather_full, norm_sq


def measure_layer_times(model_cfg, seed: int, batch: int) -> list[float]:
    """Forward+backward seconds per layer on this process (for parallel.partition='time')."""
    model = GPT(model_cfg, seed)
    x = tf.constant(np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, model_cfg.block_size)))
    h = tf.random.normal([batch, model_cfg.block_size, model_cfg.n_embd])
    times = []
    for i in model.layers:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with tf.GradientTape() as tape:
                inp = x if i == 0 else h
                if i:
                    tape.watch(inp)
                y = tf.reduce_mean(tf.square(model.run_layer(i, inp)))
            tape.gradient(y, list(model.params.values()) + ([inp] if i else []))
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


class PipelineEngine:
    def __init__(self, cfg, layout, rt, tp=None):
        rt.require_mpi("pipeline parallelism (parallel.pp > 1)")
        self.cfg, self.layout, self.m = cfg, layout, cfg.parallel.microbatches
        par = cfg.parallel
        p, v, stage = layout.pp, par.virtual_stages, layout.pp_rank
        # collective over COMM_WORLD: role ranks join it in strategies/roles.join_trainer_startup
        self.pp_comm = subcomms(rt.comm, layout, "pp")
        self.timeout = cfg.train.step_timeout
        self.chunks = pl.stage_chunks(pl.split_layers(cfg, rt, p * v, measure_layer_times), p, v, stage)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.model = GPT(cfg.model, cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank,
                         layers=sorted(i for c in self.chunks for i in c), tp=self.tp)
        self.names, self.vars = list(self.model.params), list(self.model.params.values())
        self.chunk_names = [names_for_layers(cfg.model, c) for c in self.chunks]
        self.comm = Collectives(rt.process_set(layout.group("dp")))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.pipe = pl.Pipeline(self.pp_comm, p, stage, self.m, v, par.schedule, self.timeout)
        self.tied_peer = pl.tied_peer(p, self.model.layers, cfg.model.n_layer)
        self.saved, self.grads = {}, {}
        self.zero = pl.make_zero(cfg, self, NumpyCollectives) if par.zero else None
        self.opt = AdamW(self.vars, cfg.optim) if self.zero is None else None

    # StageRunner --------------------------------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        layers = self.chunks[chunk]
        x = tf.constant(inp)
        tape = tf.GradientTape()
        with tape:
            if layers[0] != 0:
                tape.watch(x)
            out = self.model.run_layers(layers, x, training=True)
            if target is not None:
                loss = self.model.loss_from_logits(out, tf.constant(target))
                out = loss / self.m
        self.saved[(mb, chunk)] = (tape, x, out)
        return float(loss) if target is not None else out.numpy()

    def backward(self, chunk, mb, grad):
        tape, x, out = self.saved.pop((mb, chunk))
        names = self.chunk_names[chunk]
        sources = [self.model.params[n] for n in names] + ([x] if self.chunks[chunk][0] != 0 else [])
        grads = tape.gradient(out, sources, output_gradients=None if grad is None else tf.constant(grad))
        for n, g in zip(names, grads):
            g = tf.convert_to_tensor(g)  # wte's gradient can be IndexedSlices (the gather)
            self.grads[n] = g if n not in self.grads else self.grads[n] + g
        return grads[-1].numpy() if self.chunks[chunk][0] != 0 else None

    # one optimizer step ---------------------------------------------------------------------
    def train_step(self, x, y, lr) -> StepResult:
        self.grads = {}
        norm = []
        loss = self.pipe.run(self, np.split(x, self.m), np.split(y, self.m),
                             lambda: norm.append(self._reduce_and_step(lr)))
        mean = self.comm.allreduce(tf.constant([loss], tf.float64), op="average", name="pp.loss")
        return StepResult(loss=float(mean[0]), grad_norm=norm[0])

    def _reduce_and_step(self, lr) -> float:
        grads = {n: self.grads.get(n, tf.zeros_like(v)) for n, v in zip(self.names, self.vars)}
        if self.tied_peer is not None:
            grads["wte"] = tf.constant(pl.sum_with_peer(self.pp_comm, self.tied_peer, grads["wte"].numpy(),
                                                        self.timeout))
        glist = [grads[n] for n in self.names]
        if self.zero is not None:   # reduce-scatter, this rank's AdamW shard, allgather
            new, norm = self.zero.step(self.flat.flatten([g.numpy() for g in glist]),
                                       self.flat.flatten([v.numpy() for v in self.vars]), lr)
            for v, a in zip(self.vars, self.flat.unflatten(new).values()):
                v.assign(a)
            return norm
        if self.comm.size > 1:
            glist = self.comm.grouped_allreduce(glist, name="pp.grads", **self.reduce.kwargs())
        # wte is held twice (first and last stage); count it once in the global norm.
        mine = [(n, g) for n, g in zip(self.names, glist) if not (n == "wte" and self.tied_peer == 0)]
        norm = float(np.sqrt(pl.allreduce_sum(self.pp_comm, float(norm_sq(mine, self.tp)), self.timeout,
                                              "pipeline grad-norm allreduce")))
        clip = self.cfg.optim.grad_clip
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        self.opt.apply([g * coef for g in glist], tf.constant(lr, tf.float64))
        return norm

    # evaluation ---------------------------------------------------------------------------
    def evaluate(self, x, y) -> EvalResult:
        out = self.pipe.forward_only(
            lambda c, a: self.model.run_layers(self.chunks[c], tf.constant(a), training=False).numpy(), x)
        res = np.zeros(3)
        if out is not None:
            logits, t = tf.constant(out), tf.constant(np.asarray(y).reshape(-1))
            full = tf.reshape(self.model.full_logits(logits), [-1, self.cfg.model.vocab_size])
            res[:] = (float(self.model.loss_from_logits(tf.reshape(logits, [t.shape[0], -1]), t)) * int(t.shape[0]),
                      int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(full, -1), t), tf.int64))), int(t.shape[0]))
        res = pl.bcast_from_last(self.pipe, res)
        return EvalResult(float(res[0]), int(res[1]), int(res[2]))

    def allreduce_sum(self, values):
        return self.comm.allreduce(tf.constant(np.asarray(values, np.float64)), op="sum", name="pp.metrics").numpy()

    # state: gathered over tp and the pipeline so a checkpoint is the whole model --------------
    def _local_state(self) -> dict:
        out = {n: v.numpy().copy() for n, v in zip(self.names, self.vars)}
        if self.zero is not None:   # collective over the dp group
            return {**out, **pl.zero_moments(self.zero, self.flat)}
        step = int(self.opt.step.numpy())
        if step > 0:
            out.update({f"optim.m.{n}": m.numpy().copy() for n, m in zip(self.names, self.opt.m)})
            out.update({f"optim.v.{n}": v.numpy().copy() for n, v in zip(self.names, self.opt.v)})
        out["optim.step"] = np.array(step, np.int64)
        return out

    def state_dict(self) -> dict:
        """The whole model on pipeline rank 0 (gathered over tp and pp; collective)."""
        local = gather_full(self._local_state(), self.tp)
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.layout.pp, local, self.timeout)

    def shard_state(self) -> tuple[dict, dict]:
        """This stage's (tp slice of its) parameters and moments, and their placements; under
        ZeRO-1 each dp rank's range of the moments (nothing gathered)."""
        if self.zero is not None:
            params = {n: v.numpy().copy() for n, v in zip(self.names, self.vars)}
            return self.zero.shard_state(params, tp_plan.placements(params, self.tp.size, self.tp.rank)
                                         if self.tp else None)
        local = self._local_state()
        return local, (tp_plan.placements(local, self.tp.size, self.tp.rank) if self.tp else {})

    def load_state_dict(self, state: dict) -> None:
        # only this stage's arrays (a sharded checkpoint reads just those)
        keys = [*self.names, *(f"optim.{mv}.{n}" for mv in "mv" for n in self.names), "optim.step"]
        mine = tp_plan.shard_state(state, self.tp.size if self.tp else 1, self.tp.rank if self.tp else 0, keys=keys)
        for n, v in zip(self.names, self.vars):
            v.assign(np.asarray(mine[n], np.float32))
        step = int(mine.get("optim.step", 0))
        if step and f"optim.m.{self.names[0]}" in mine and self.zero is not None:
            self.zero.load_shard(mine, step)
        elif step and f"optim.m.{self.names[0]}" in mine:
            for n, m, v in zip(self.names, self.opt.m, self.opt.v):
                m.assign(mine[f"optim.m.{n}"])
                v.assign(mine[f"optim.v.{n}"])
            self.opt.step.assign(step)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.vars)

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0):
        """Every stage calls it: the whole model is gathered to pipeline rank 0, which samples;
        other stages return []."""
        state = self.state_dict()
        if self.layout.pp_rank != 0:
            return []
        full = GPT(self.cfg.model, self.cfg.train.seed)
        for n, v in full.params.items():
            v.assign(np.asarray(state[n], np.float32))

        def last_logits(ids):
            return full(tf.constant([ids], tf.int64))[0, -1].numpy().astype(np.float64)
        return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)

    def full_params(self) -> dict:
        """The whole parameters, without optimizer state, on pipeline rank 0 (other stages get
        their own back): tp slices gathered, then every stage's arrays sent to the first.
        Collective over this rank's tp group and pipeline. For the snapshots that trainers send
        to evaluators and generators (hvdllm/strategies/roles.py)."""
        local = gather_full({n: v.numpy() for n, v in zip(self.names, self.vars)}, self.tp)
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.layout.pp, local, self.timeout)
