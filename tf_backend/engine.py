"""The TensorFlow Engine: forward/backward, Horovod gradient aggregation, clipping, AdamW.

Per train_step the messages are, in order: one grouped allreduce of every gradient over the
data-parallel process set (op and wire dtype from cfg.aggregation), then one allreduce of the
scalar loss for logging (always 'average', never compressed: it is a metric, not a gradient).
Everything else is local arithmetic, compiled once with tf.function (see TrainFn below).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdllm import sampling
from hvdllm.engine import EvalResult, StepResult
from hvdllm.params import decays

from .collectives import Collectives, check_compression, dp_process_set
from .model import GPT

# Measured per train_step on 2 CPU threads, 1 rank: tiny model (2x32, T=16, B=8) eager 62.5 ms,
# tf.function 6.0 ms; demo model (4x128, T=128, B=16) eager 309 ms, tf.function 124 ms. XLA
# (jit_compile) on the forward/backward was slower on CPU (119 vs 102 ms), so it is not used.
COMPILE = True

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


class AdamW:
    """torch.optim.AdamW's arithmetic on tf.Variables (see hvdllm/engine.py).

    Step-dependent scalars (bias corrections, step size, decay factor) are formed in float64 and
    rounded to float32 once, as torch does with its Python-float scalars.
    """

    def __init__(self, variables, optim_cfg):
        self.cfg = optim_cfg
        self.vars = list(variables)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.vars]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.vars]
        self.decay = [decays(v.shape) for v in self.vars]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

    def apply(self, grads, lr):
        """One update with float64 scalar tensor `lr`."""
        o = self.cfg
        self.step.assign_add(1)
        t = tf.cast(self.step, tf.float64)
        bc1 = 1.0 - tf.pow(tf.constant(o.beta1, tf.float64), t)
        bc2_sqrt = tf.cast(tf.sqrt(1.0 - tf.pow(tf.constant(o.beta2, tf.float64), t)), tf.float32)
        step_size = tf.cast(lr / bc1, tf.float32)
        shrink = tf.cast(1.0 - lr * o.weight_decay, tf.float32)
        for p, g, m, v, d in zip(self.vars, grads, self.m, self.v, self.decay):
            if d and o.weight_decay:
                p.assign(p * shrink)  # decoupled weight decay, before the moment update
            m.assign(o.beta1 * m + (1.0 - o.beta1) * g)
            v.assign(o.beta2 * v + (1.0 - o.beta2) * g * g)
            p.assign_sub(step_size * m / (tf.sqrt(v) / bc2_sqrt + o.eps))


class Engine:
    def __init__(self, cfg, layout, collectives: Collectives | None = None):
        self.cfg, self.layout = cfg, layout
        check_compression(cfg.aggregation.compression)
        self.comm = collectives or Collectives(dp_process_set(layout))
        # Same weights on every rank; dropout streams differ per rank (as the torch backend).
        self.model = GPT(cfg.model, cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank)
        self.names = list(self.model.params)
        self.vars = list(self.model.params.values())
        self._broadcast_parameters()
        self.opt = AdamW(self.vars, cfg.optim)
        wrap = (lambda f, sig: tf.function(f, input_signature=sig, reduce_retracing=True)) \
            if COMPILE else (lambda f, sig: f)
        self._train = wrap(self._train_step, [_TOKENS, _TOKENS, tf.TensorSpec([], tf.float64)])
        self._eval = wrap(self._evaluate, [_TOKENS, _TOKENS])
        self._logits = wrap(self.model.__call__, [_TOKENS])

    def _broadcast_parameters(self):
        """Rank 0's initial weights win: ranks agree even if their seeds or files differed."""
        if self.comm.size == 1:
            return
        for name, v in zip(self.names, self.vars):
            v.assign(self.comm.broadcast(v, root=0, name=f"init.{name}"))

    # training --------------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        loss, norm = self._train(_ids(x), _ids(y), tf.constant(lr, tf.float64))
        return StepResult(loss=float(loss), grad_norm=float(norm))

    def _train_step(self, x, y, lr):
        with tf.GradientTape() as tape:
            loss = self.model.loss(x, y, training=True)
        # wte's gradient mixes a gather (IndexedSlices) and a matmul; reduce dense tensors only.
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, self.vars)]
        grads, norm = self._aggregate_and_clip(grads)
        self.opt.apply(grads, lr)
        if self.comm.size > 1:
            loss = self.comm.allreduce(loss, op="average", name="loss")
        return loss, norm

    def _aggregate_and_clip(self, grads):
        a = self.cfg.aggregation
        if self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, op=a.op, name="grads", compression=a.compression)
        # norm of per-tensor norms: the same reduction order as the torch backend
        norm = tf.norm(tf.stack([tf.norm(g) for g in grads]))
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = tf.minimum(clip / (norm + 1e-6), 1.0)
            grads = [g * coef for g in grads]
        return grads, norm

    # evaluation and metrics ------------------------------------------------------------------
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        loss_sum, correct = self._eval(_ids(x), _ids(y))
        return EvalResult(float(loss_sum), int(correct), int(np.asarray(y).size))

    def _evaluate(self, x, y):
        logits = self.model(x, training=False)
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.int64))
        return tf.reduce_sum(per_token), correct

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        t = tf.constant(np.asarray(values, dtype=np.float64))
        return self.comm.allreduce(t, op="sum", name="metrics").numpy()

    # state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {n: v.numpy().copy() for n, v in zip(self.names, self.vars)}
        step = int(self.opt.step.numpy())
        if step > 0:  # like torch: no moments before the first step
            for n, m, v in zip(self.names, self.opt.m, self.opt.v):
                out[f"optim.m.{n}"] = m.numpy().copy()
                out[f"optim.v.{n}"] = v.numpy().copy()
        out["optim.step"] = np.array(step, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for n, v in zip(self.names, self.vars):
            v.assign(np.asarray(state[n], dtype=np.float32))
        step = int(state.get("optim.step", 0))
        if step > 0 and f"optim.m.{self.names[0]}" in state:
            for n, m, v in zip(self.names, self.opt.m, self.opt.v):
                m.assign(np.asarray(state[f"optim.m.{n}"], dtype=np.float32))
                v.assign(np.asarray(state[f"optim.v.{n}"], dtype=np.float32))
            self.opt.step.assign(step)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.vars)

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0) -> list[int]:
        """Sample with hvdllm.sampling (shared with torch): the last position's logits go to
        numpy float64; top-k, temperature and one inverse-CDF draw per token from
        np.random.default_rng(seed). Equal logits therefore give equal tokens in both backends."""
        def last_logits(ids):
            return self._logits(tf.constant([ids], tf.int64))[0, -1].numpy().astype(np.float64)
        return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)


def _ids(a) -> tf.Tensor:
    return tf.constant(np.asarray(a, dtype=np.int64))
