"""The TensorFlow Engine: forward/backward, gradient aggregation, clipping and the optimizer step.

Which messages a step sends depends on the strategy (each documented in its core file):
- data parallel (default): one grouped allreduce of every gradient over the dp process set
  (op, wire dtype and predivide from cfg.aggregation);
- ZeRO-1 (parallel.zero=1): hvdllm/strategies/zero.py (reducescatter, norm allreduce, allgather);
- local SGD (localsgd.every=H): no gradient messages; every H steps hvdllm/strategies/local_sgd.py.
Then one allreduce of the scalar loss, for logging ('average', never compressed).
The per-step arithmetic is compiled once with tf.function (see COMPILE).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdllm import aggregation, lora, task
from hvdllm.engine import EvalResult, StepResult
from hvdllm.engines import GPTEngineBase
from hvdllm.flat import FlatLayout
from hvdllm.loss_scale import LossScaler
from hvdllm.optim import clip_coef
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies.local_sgd import LocalSGD
from hvdllm.strategies.zero import Zero1

from . import lora as lora_backend
from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .model import GPT
from .optim import AdamW
from .tensor_parallel import TPGroup, norm_sq

# Measured per train_step on 2 CPU threads, 1 rank: tiny model (2x32, T=16, B=8) eager 62.5 ms,
# tf.function 6.0 ms; demo model (4x128, T=128, B=16) eager 309 ms, tf.function 124 ms. XLA
# (jit_compile) on the forward/backward was slower on CPU (119 vs 102 ms), so it is opt-in:
# train.compile = true (below, _compute).
COMPILE = True

_MICRO = tf.TensorSpec([None, None, None], tf.int64)  # (accumulation k, batch, T)
_TOKENS = tf.TensorSpec([None, None], tf.int64)


def configure(threads: int, seed: int | None = None) -> None:
    """Set compute threads (0 = TF's defaults) and TF's global seed, before TF's runtime starts.

    TF fixes its thread pools when its context is first used; after that a different value
    cannot be applied, and silently running with other pools would skew timings, so we say so.
    """
    if seed is not None:
        tf.random.set_seed(seed)
    if threads <= 0:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
    except RuntimeError as e:
        raise RuntimeError(f"tf_backend.configure(threads={threads}) must run before TensorFlow "
                           f"executes anything (its thread pools are already fixed): {e}") from e


def matmul_flops(precision: str = "fp32", n: int = 512) -> float:
    """FLOP/s of an n x n matrix product on this rank's compute threads, in the run's precision
    (hvdllm/mfu.py: the peak a CPU run's MFU is measured against); the best of 5 timings."""
    import time
    if tf.config.list_logical_devices("GPU"):   # a GPU: a product big enough to reach its peak
        n = max(n, 4096)
    dtype = tf.bfloat16 if precision == "bf16" else tf.float32
    rng = np.random.default_rng(0)
    a, b = (tf.cast(tf.constant(rng.standard_normal((n, n)), tf.float32), dtype) for _ in range(2))
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()   # .numpy(): the product is done, not only dispatched
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class Engine(GPTEngineBase):
    """The built-in GPT under data parallelism (with tp layers, ZeRO-1 or local SGD inside)."""

    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self.cfg, self.layout = cfg, layout
        self.comm = collectives or Collectives()
        self.ncomm = NumpyCollectives(self.comm)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.tp_ncomm = NumpyCollectives(self.tp.coll) if self.tp else None
        # Same weights on every rank; dropout streams differ per rank (as the torch backend).
        self.model = GPT(task.model_config(cfg), cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank,
                         tp=self.tp)
        self.model.configure(cfg.train)   # checkpointing, precision
        # task.kind = 'classify': the head's loss and evaluation (tf_backend/classify.py)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self._loss = self.head.loss if self.head is not None else self.model.loss
        self.named = list(self.model.params.items())
        if lora.enabled(cfg):   # only the adapters (and a classifier's head) train
            self.base_named, self.lora = self.named, True
            self.named = lora_backend.attach(self.model, cfg)
        self.names = [n for n, _ in self.named]
        self.vars = [v for _, v in self.named]
        self._broadcast_parameters()
        self.flat = FlatLayout(tp_plan.local_shapes(self.param_shapes, self.tp.size if self.tp else 1))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.steps_done = 0
        if cfg.parallel.zero:   # under tp: each tp rank's slices sharded over its dp group
            tp_args = {} if self.tp is None else {"tp": self.tp.coll, "kind": tp_plan.norm_kind}
            self.zero = Zero1(self.flat, self.comm, cfg.optim, cfg.aggregation, **tp_args)
        if cfg.localsgd.every:   # both on tf tensors, through the tensor Collectives
            self.local = LocalSGD(cfg.localsgd, self.comm, self.device_flat_params())
        self.opt = AdamW(self.vars, cfg.optim) if self.zero is None else None
        wrap = (lambda f, sig: tf.function(f, input_signature=sig, reduce_retracing=True, autograph=False)) \
            if COMPILE else (lambda f, sig: f)
        if cfg.train.precision == "fp16":   # dp, tp, ZeRO-1, local SGD (config validation)
            self.scaler = LossScaler()
        # train.compile: XLA on the loss and gradients only. Horovod's ops have no XLA kernels,
        # so the collectives, clipping and AdamW stay in the outer (plain) tf.function; under tp
        # the blocks hold the tp collectives, so the model compiles the pieces between them (model._block)
        self._compute = (tf.function(self._loss_and_grads, jit_compile=True, autograph=False)
                         if cfg.train.compile and self.tp is None else self._loss_and_grads)
        self._train = wrap(self._train_step, [_MICRO, _MICRO, tf.TensorSpec([], tf.float64),
                                              tf.TensorSpec([], tf.float32)])
        self._grads = wrap(lambda xs, ys: self._compute(xs, ys), [_MICRO, _MICRO])
        # fp16 under ZeRO-1: the loss scale is this step's input (it changes: no retracing)
        self._scaled_grads = wrap(lambda xs, ys, scale: self._compute(xs, ys, scale),
                                  [_MICRO, _MICRO, tf.TensorSpec([], tf.float32)])
        self._eval = wrap(self.head.evaluate if self.head is not None else self._evaluate, [_TOKENS, _TOKENS])
        self._logits = wrap(lambda idx: self.model.full_logits(self.model(idx)), [_TOKENS])


    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)

    @staticmethod
    def assign(v, a) -> None:
        v.assign(np.asarray(a, np.float32))

    @staticmethod
    def concat_flat(tensors) -> tf.Tensor:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)

    @staticmethod
    def assign_flat(variables, flat: tf.Tensor) -> None:
        for v, piece in zip(variables, tf.split(flat, [int(np.prod(v.shape)) for v in variables])):
            v.assign(tf.reshape(piece, v.shape))

    def optimizer_state(self) -> dict:
        return self.opt.state(self.names)

    def load_optimizer_state(self, state, step: int) -> None:
        self.opt.load(self.names, state, step)

    def last_logits(self, ids) -> np.ndarray:
        return to_host(self._logits(from_host([ids], tf.int64))[0, -1]).astype(np.float64)

    # training --------------------------------------------------------------------------------
    def _micro(self, x, y):
        """(k, b, T) stacks of the core's k micro-batches (it checks that k divides the batch)."""
        parts = aggregation.split_microbatches(np.asarray(x, np.int64), np.asarray(y, np.int64),
                                               self.cfg.aggregation.accumulation)
        return from_host(np.stack([p[0] for p in parts])), from_host(np.stack([p[1] for p in parts]))

    def _loss_and_grads(self, xs, ys, scale=None):
        """Gradient of the mean loss over all k micro-batches (each contributes loss/k); with
        `scale` (fp16), of the loss times it."""
        k = self.cfg.aggregation.accumulation
        total, acc = tf.constant(0.0), None
        for i in range(k):  # k is fixed per run: unrolled once at trace time
            with tf.GradientTape() as tape:
                loss = self._loss(xs[i], ys[i], training=True) / k
                scaled = loss if scale is None else loss * scale
            # wte's gradient mixes a gather (IndexedSlices) and a matmul: make every one dense
            g = [tf.convert_to_tensor(t) for t in tape.gradient(scaled, self.vars)]
            acc = g if acc is None else [a + b for a, b in zip(acc, g)]
            total += loss
        return total, acc

    def _fold_loss(self) -> bool:
        """The loss rides in the gradients' fused message (one Horovod op per step instead of
        two: a second op costs a negotiation cycle); not when the wire is compressed or the op
        is adasum, where it is averaged on its own."""
        r = self.reduce
        return self.local is None and self.comm.size > 1 and r.compression == "none" and r.op != "adasum"

    def _train_step(self, xs, ys, lr, scale):
        loss, grads = self._compute(xs, ys, scale if self.scaler is not None else None)
        if self._fold_loss():
            *grads, loss = self.comm.grouped_allreduce(grads + [tf.reshape(loss, [1])], name="grads",
                                                       **self.reduce.kwargs())
            # aggregation.op 'sum' sums the loss too; predivide's "sum" op is an average already
            loss = loss[0] / self.comm.size if self.cfg.aggregation.op == "sum" else loss[0]
        elif self.local is None and self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, name="grads", **self.reduce.kwargs())
        if self.tp:  # sharded parameters' squares summed over the tp group, replicated ones once
            norm = tf.cast(tf.sqrt(norm_sq(list(zip(self.names, grads)), self.tp)), tf.float32)
        else:  # norm of per-tensor norms: the same reduction order as the torch backend
            norm = tf.norm(tf.stack([tf.norm(g) for g in grads]))
        if self.scaler is not None:   # fp16: the norm of the true gradients, which clipping sees
            norm = norm / scale
            coef = clip_coef(norm, self.cfg.optim.grad_clip, minimum=tf.minimum) / scale
            grads = [g * coef for g in grads]

            def apply():
                self.opt.apply(grads, lr)
                return tf.constant(True)
            tf.cond(tf.math.is_finite(norm), apply, lambda: tf.constant(False))   # an overflow: no update
            return loss, norm
        if self.cfg.optim.grad_clip > 0:
            coef = clip_coef(norm, self.cfg.optim.grad_clip, minimum=tf.minimum)
            grads = [g * coef for g in grads]
        self.opt.apply(grads, lr)
        return loss, norm

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        xs, ys = self._micro(x, y)
        self.steps_done += 1
        if self.zero is not None:
            scale = self._step_scale()   # fp16: an injected overflow's infinite scale on this rank only
            loss, grads = self._scaled_grads(xs, ys, tf.constant(scale, tf.float32)) if self.scaler \
                else self._grads(xs, ys)
            new, norm = self.zero.step(self.concat_flat(grads), self.device_flat_params(), lr,
                                       scale=None if self.scaler is None else self.scaler.scale)
            if self.scaler is None or np.isfinite(norm):   # the job-wide norm: every rank skips alike
                self.set_device_flat_params(new)
        else:
            loss, norm = self._train(xs, ys, tf.constant(lr, tf.float64), tf.constant(self._step_scale(), tf.float32))
            if self.local is not None and self.local.due(self.steps_done, self.cfg.train.steps):
                self.set_device_flat_params(self.local.sync(self.device_flat_params()))
        if self.comm.size > 1 and (self.zero is not None or not self._fold_loss()):
            loss = self.comm.allreduce(loss, op="average", name="loss")
        # the same on every rank (the reduced norm); local SGD: this rank's own, as it steps alone
        skipped = self.scaler is not None and not np.isfinite(float(norm))
        if self.scaler is not None:
            self.scaler.update(not skipped)
        # tensors, read only when someone looks (the trainer: when it logs): no device sync here
        return StepResult(loss=loss, grad_norm=norm, skipped=skipped)

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, its flat gradient) with no communication: for strategies
        that move gradients themselves (parameter servers)."""
        xs, ys = self._micro(x, y)   # fp16: the loss scaled by this step's scale (the caller unscales)
        loss, grads = self._scaled_grads(xs, ys, tf.constant(self._step_scale(), tf.float32)) if self.scaler \
            else self._grads(xs, ys)
        return float(loss), self.flat_grads(grads)

    # evaluation --------------------------------------------------------------------------------
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        if self.head is not None:   # classify: the logits come back too (hvdllm/engine.py)
            loss_sum, correct, logits = self._eval(_ids(x), _ids(y))
            return EvalResult(float(loss_sum), int(correct), len(x), logits=to_host(logits))
        loss_sum, correct = self._eval(_ids(x), _ids(y))
        return EvalResult(float(loss_sum), int(correct), int(np.asarray(y).size))

    def _evaluate(self, x, y):
        logits = self.model(x, training=False)
        n = tf.cast(tf.size(y), tf.float32)
        loss_sum = self.model.loss_from_logits(logits, y) * n
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(self.model.full_logits(logits), -1), y), tf.int64))
        return loss_sum, correct


def _ids(a) -> tf.Tensor:
    return from_host(np.asarray(a, dtype=np.int64))
