"""The TensorFlow ShardedEngine: ZeRO-2 / ZeRO-3 (hvdllm/strategies/zero_sharded.py drives the
step; this file supplies its per-unit primitives on the TF model), eager.

ZeRO-2: the parameters are the model's tf.Variables, whole; a unit's forward runs under its own
GradientTape (watching its input), kept until the unit's backward, as the pipeline engine keeps
a chunk's. ZeRO-3: the variables are dropped after sharding; a unit's gathered weights are plain
tensors put into the model's parameter table only while the unit runs. A tape holds what it
recorded, the gathered weights included, so the forward runs without one and keeps only the
unit's input (and the dropout generator's state); the backward gathers again and recomputes the
unit's forward under a tape (activation checkpointing per unit: one more forward of each unit
per step, for no weights held between a unit's forward and its backward). Horovod's TF ops
block in eager mode, so the next unit's gather, issued one unit ahead as torch's is, runs on a
thread of its own (zero_sharded.GatherAhead) while this unit computes; not beside tp, and not
inside pipeline stages (ZeroSharded.stage_forward: the schedule alone knows the next unit).
train.compile: each unit's training forward (with the last unit's loss) is one XLA function
(unit_fns), traced once; the gathers, reduce-scatters and the optimizer stay outside (Horovod's
ops have no XLA kernels), as the pipeline stages' chunks (tf_backend/pipeline.py).
"""
from __future__ import annotations

import functools
import weakref

import numpy as np
import tensorflow as tf

from hvdllm import lora, task
from hvdllm.engine import EvalResult
from hvdllm.strategies.zero_sharded import GatherAhead, ShardedEngineBase, ShardedStageBase

from . import lora as lora_backend
from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .engine import Engine
from .model import GPT
from .pipeline import PipelineEngine, measure_layer_times
from .tensor_parallel import TPGroup


class ShardedEngine(ShardedEngineBase):
    """The built-in GPT under parallel.zero = 2 or 3 (with tp slices inside)."""

    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self._groups(cfg, layout, collectives or Collectives(), tp, NumpyCollectives)
        self.recompute = cfg.parallel.zero == 3
        # ZeRO-3: no variables at all (only the names): the weights live in the shards; under
        # LoRA the frozen base is built whole and only the adapters are sharded (zero_sharded.units_for)
        self.model = GPT(task.model_config(cfg), cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank,
                         tp=self.tp, materialise=not self.recompute or lora.enabled(cfg))
        self.model.configure(cfg.train)   # activation checkpointing, precision: as the Engine's
        # task.kind = 'classify': the last unit is the head's pooling and loss (tf_backend/classify.py)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.named = list(self.model.params.items())
        self.table = {n: self.model.params for n, _ in self.named}   # where the model reads each weight
        if lora.enabled(cfg):   # only the adapters (and a classifier's head) train
            self.base_named, self.lora = self.named, True
            self.named = lora_backend.attach(self.model, cfg)
            self.table.update({n: self.model.adapters.vars for n in self.model.adapters.vars})
        shapes = {**self.local_shapes(), **lora.trainable_shapes(cfg)} if self.lora else self.local_shapes()
        self.shapes = {n: shapes[n] for n, _ in self.named}
        self._gather_ahead()
        self._shard_model()
        self._compile_units()   # one per unit: after _shard_model has made them

    unit_fns = None   # train.compile: {unit: its XLA function} (_compile_units); else eager

    def _compile_units(self) -> None:
        """train.compile: each unit's training forward as one tf.function(jit_compile=True), as
        tf_backend/pipeline.py compiles each chunk's. The tape around its call (the ZeRO-2
        forward's, ZeRO-3's recompute's) records it as one op, whose gradient TF also builds as
        one XLA function. ZeRO-3's gathered weights are its arguments, not read from the table
        while tracing: a traced read would capture the first step's tensors as constants, and
        every later step would compute with them."""
        if not self.cfg.train.compile:
            return
        self.unit_fns = {u: tf.function(functools.partial(self._unit_xla, u), jit_compile=True, autograph=False)
                         for u in self.uses}   # by the model's layer index, as uses

    def _unit_xla(self, u, x, target, weights):
        """_run with ZeRO-3's gathered weights (the function's arguments) in the table while it traces."""
        names = self.uses[u] if self.recompute else []
        held = [self.table[n][n] for n in names]
        for n, w in zip(names, weights):
            self.table[n][n] = w
        try:
            return self._run(u, x, target)
        finally:
            for n, w in zip(names, held):
                self.table[n][n] = w

    def _unit(self, u, x, target):
        """Unit u's training forward: compiled (unit_fns) or eager."""
        if self.unit_fns is None:
            return self._run(u, x, target)
        return self.unit_fns[u](x, target, [self.table[n][n] for n in self.uses[u]] if self.recompute else [])

    def _gather_ahead(self) -> None:
        """ZeRO-3 over dp ranks without tp: gather_async on a thread (GatherAhead), each unit's
        allgather issued while the unit before it computes. Not beside tp, for torch's reason
        (torch_backend/sharded.py: two process sets' ops in flight at once, taken in another
        order on each rank, deadlocked four ranks). The thread gets Collectives of its own over
        the same process set: its traced functions (one per gather name) are no other
        thread's, and a wrapper of self.comm that counts what it moves (bench memory's, which
        counts gather_async's gathers where they are issued, as torch's) does not see them twice.
        Measured at np=2 on 2 CPU cores shared with other jobs (load 3.5-3.9; 8 blocks of width
        512, T=64, batch 4 per rank; ahead and synchronous engines interleaved in one job): the
        main thread spent 54-56 ms per step inside the gathers ahead against 107-108 ms
        synchronously (half hidden: the first unit of a step, and the block after the small
        embedding, wait), a step of 1355-1360 ms against 1360-1389 ms: within the noise, not
        slower, for one unit more held. Recomputing each unit, not the gathers, is most of
        ZeRO-3's cost here (x1.78 of zero=0's step)."""
        if not self.recompute or self.comm.size == 1 or self.tp is not None:
            return
        wire = Collectives(self.comm.process_set) if isinstance(self.comm, Collectives) else self.comm
        self.ahead = GatherAhead(wire.allgather, self.cfg.train.step_timeout)
        self.gather_async = (self.ahead.start, self.ahead.finish)
        weakref.finalize(self, self.ahead.close, 0.0)   # an engine dropped unclosed (tests) ends its thread

    # backend primitives (hvdllm/engines.py, zero_sharded.py) --------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    assign = staticmethod(Engine.assign)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)

    # measured: TFOps' float32 dot over a whole shard put the norm 8e-6 relative off the
    # unsharded engine's; squared and summed in float64, 4e-8
    @staticmethod
    def sqnorms(x, groups):
        """TFOps.sqnorms in float64: a float32 dot over a whole shard is too coarse for the norm
        to equal the unsharded engine's."""
        zero = tf.zeros([], tf.float64)
        return tf.stack([sum((tf.reduce_sum(tf.square(tf.cast(x[s:e], tf.float64))) for s, e in spans), zero)
                         for spans in groups])

    def shape_of(self, name: str) -> tuple:
        return self.shapes[name]

    def load_unit(self, names, flat) -> None:
        sizes = [int(np.prod(self.shapes[n])) for n in names]
        for n, piece in zip(names, tf.split(flat, sizes)):
            if self.recompute:
                self.table[n][n] = tf.reshape(piece, self.shapes[n])
            else:
                self.table[n][n].assign(tf.reshape(piece, self.shapes[n]))

    def free_unit(self, names) -> None:
        for n in names:
            self.table[n][n] = None

    def micro(self, x, y):
        xs, ys = from_host(np.asarray(x, np.int64)), from_host(np.asarray(y, np.int64))
        return tf.split(xs, self.k), tf.split(ys, self.k)

    def _run(self, u, x, target):
        if target is not None and self.head is not None:   # classify: ln_f, pooling, head, loss
            return self.head.loss_of(self.head.head(x, target), target) / self.k
        out = self.model.run_layer(u, x, training=True)
        if target is not None:
            out = self.model.loss_from_logits(out, target) / self.k
        return out

    def _dropout_state(self):
        """The generator's state before a unit's forward, for its recompute to draw the same masks
        (model.dropout's and finetune.lora_dropout's: one generator)."""
        drops = self.cfg.model.dropout or (lora.enabled(self.cfg) and lora.dropout(self.cfg))
        return tf.identity(self.model._rng.state) if drops else None

    def unit_forward(self, u, x, target):
        if self.recompute:   # no tape: it would hold the gathered weights until the backward
            rng = self._dropout_state()   # before the forward draws its masks (the recompute redraws them)
            return self._unit(u, x, target), (x, target, rng)
        tape = tf.GradientTape()
        with tape:
            if u:
                tape.watch(x)
            out = self._unit(u, x, target)
        return out, (tape, x, out)

    def unit_backward(self, u, handle, dy):
        weights = [self.table[n][n] for n in self.uses[u]]
        if self.recompute:   # the unit's forward again, under a tape, with the forward's dropout masks
            x, target, rng = handle
            now = self._dropout_state()
            if rng is not None:
                self.model._rng.state.assign(rng)
            tape = tf.GradientTape()
            with tape:
                tape.watch(weights + ([x] if u else []))
                out = self._unit(u, x, target)
            if now is not None:
                self.model._rng.state.assign(now)
        else:
            tape, x, out = handle
        if isinstance(dy, float):   # the loss's backward from fp16's loss scale (zero_sharded.Runner)
            dy = tf.fill(tf.shape(out), tf.constant(dy, out.dtype))
        grads = tape.gradient(out, weights + ([x] if u else []), output_gradients=dy)
        # wte's gradient is IndexedSlices (the gather): dense, as the flat reduction needs
        grads = [tf.zeros(self.shapes[n]) if g is None else tf.convert_to_tensor(g)
                 for n, g in zip(self.uses[u] + ["x"], grads)]
        return (grads[-1] if u else None), grads[:len(self.uses[u])]

    # evaluation and generation --------------------------------------------------------------
    def tokens(self, ids):
        return from_host(np.asarray(ids, np.int64))

    def eval_unit(self, u, x):
        return self.model.run_layer(u, x, training=False)

    def evaluate(self, x, y):
        """classify: the blocks unit by unit, then the head on their output (its pooling reads y's
        lengths); a language model's: ShardedEngineBase's."""
        if self.head is None:
            return ShardedEngineBase.evaluate(self, x, y)
        yt, last = from_host(np.asarray(y, np.int64)), len(self.uses) - 1
        loss_sum, correct, logits = self.zero.forward_only(
            lambda u, h: self.head.scores(self.head.head(h, yt), yt) if u == last
            else self.eval_unit(u, h), self.tokens(x), self)
        return EvalResult(float(loss_sum), int(correct), len(x), logits=to_host(logits))

    def score(self, logits, y):
        t = from_host(np.asarray(y, np.int64).reshape(-1))
        n = int(t.shape[0])
        full = tf.reshape(self.model.full_logits(logits), [n, -1])
        loss = self.model.loss_from_logits(tf.reshape(logits, [n, -1]), t)
        return float(loss) * n, int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(full, -1), t), tf.int64))), n

    def last_logits(self, ids) -> np.ndarray:
        logits = self.model.full_logits(self.logits(np.array([ids], dtype=np.int64)))
        return to_host(logits[0, -1]).astype(np.float64)


class ShardedPipelineEngine(ShardedStageBase):
    """A pipeline stage of the built-in GPT under parallel.zero = 2 or 3 (ShardedStageBase):
    ShardedEngine's unit primitives on the stage's layers; activations cross as host arrays."""

    def __init__(self, cfg, layout, rt, tp=None):
        layers = self._place(cfg, layout, rt, tp, measure_layer_times)
        self.recompute = cfg.parallel.zero == 3
        self.model = GPT(task.model_config(cfg), cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank,
                         layers=layers, tp=self.tp, materialise=not self.recompute)
        self.model.configure(cfg.train)
        # task.kind = 'classify': the last stage's head unit is the Classifier's (PipelineEngine's)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.named = list(self.model.params.items())
        self.table = {n: self.model.params for n, _ in self.named}   # ShardedEngine's primitives read it
        shapes = self.local_shapes()
        self.shapes = {n: shapes[n] for n, _ in self.named}
        self._stage_strategies(Collectives(rt.process_set(layout.group("dp"))), NumpyCollectives)

    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    stage_input = staticmethod(from_host)
    stage_output = staticmethod(to_host)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)
    sqnorms = staticmethod(ShardedEngine.sqnorms)
    shape_of = ShardedEngine.shape_of
    load_unit = ShardedEngine.load_unit
    free_unit = ShardedEngine.free_unit
    _run = ShardedEngine._run
    _unit = ShardedEngine._unit
    unit_fns = None   # eager: train.compile beside parallel.pp is refused under ZeRO-2/3 (config.py)
    _dropout_state = ShardedEngine._dropout_state
    unit_forward = ShardedEngine.unit_forward
    unit_backward = ShardedEngine.unit_backward
    tokens = ShardedEngine.tokens
    eval_unit = ShardedEngine.eval_unit
    whole_model_logits = PipelineEngine.whole_model_logits

    @staticmethod
    def loss_value(t):
        return float(t)

    def score(self, out, y):
        if self.head is not None:   # classify: the head's pooling and scores, as the unsharded stage's
            return self.head_scores(lambda: PipelineEngine.score(self, out, y))
        return ShardedEngine.score(self, from_host(out), y)
