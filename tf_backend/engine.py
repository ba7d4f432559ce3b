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

from hvdllm import aggregation, sampling
from hvdllm.engine import EvalResult, StepResult
from hvdllm.flat import FlatLayout
from hvdllm.params import decays, param_shapes
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies.local_sgd import LocalSGD
from hvdllm.strategies.zero import Zero1

from .collectives import Collectives, NumpyCollectives
from .model import GPT
from .tensor_parallel import TPGroup, gather_full, norm_sq

# Measured per train_step on 2 CPU threads, 1 rank: tiny model (2x32, T=16, B=8) eager 62.5 ms,
# tf.function 6.0 ms; demo model (4x128, T=128, B=16) eager 309 ms, tf.function 124 ms. XLA
# (jit_compile) on the forward/backward was slower on CPU (119 vs 102 ms), so it is not used.
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

    def state_bytes(self) -> int:
        return sum(4 * int(np.prod(v.shape)) * 2 for v in self.vars)


def make_engine(cfg, layout, rt):
    """The engine for this layout: a pipeline stage when parallel.pp > 1, else data parallel;
    either with tensor-parallel layers when parallel.tp > 1 (same choice as torch_backend)."""
    if cfg.model.layers:  # a user's layer list (hvdllm/user_model.py)
        from .sequential import SequentialEngine
        return SequentialEngine(cfg, layout, rt)
    tp = TPGroup(Collectives(rt.process_set(layout.group("tp")))) if layout.tp > 1 else None
    if layout.pp > 1:
        from .pipeline import PipelineEngine
        return PipelineEngine(cfg, layout, rt, tp)
    return Engine(cfg, layout, Collectives(rt.process_set(layout.group("dp"))), tp)


class Engine:
    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self.cfg, self.layout = cfg, layout
        self.comm = collectives or Collectives()
        self.ncomm = NumpyCollectives(self.comm)
        self.tp = tp if tp is not None and tp.size > 1 else None
        # Same weights on every rank; dropout streams differ per rank (as the torch backend).
        self.model = GPT(cfg.model, cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank, tp=self.tp)
        self.names = list(self.model.params)
        self.vars = list(self.model.params.values())
        self._broadcast_parameters()
        m = cfg.model
        self.flat = FlatLayout(tp_plan.local_shapes(param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size),
                                                    self.tp.size if self.tp else 1))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.steps_done = 0
        self.zero = None
        if cfg.parallel.zero:   # under tp: each tp rank's slices sharded over its dp group
            tp_args = {} if self.tp is None else {"tp": NumpyCollectives(self.tp.coll), "kind": tp_plan.norm_kind}
            self.zero = Zero1(self.flat, self.ncomm, cfg.optim, cfg.aggregation, **tp_args)
        self.local = LocalSGD(cfg.localsgd, self.ncomm, self.flat_params()) if cfg.localsgd.every else None
        self.opt = AdamW(self.vars, cfg.optim) if self.zero is None else None
        wrap = (lambda f, sig: tf.function(f, input_signature=sig, reduce_retracing=True)) \
            if COMPILE else (lambda f, sig: f)
        self._train = wrap(self._train_step, [_MICRO, _MICRO, tf.TensorSpec([], tf.float64)])
        self._grads = wrap(self._loss_and_grads, [_MICRO, _MICRO])
        self._eval = wrap(self._evaluate, [_TOKENS, _TOKENS])
        self._logits = wrap(lambda idx: self.model.full_logits(self.model(idx)), [_TOKENS])

    def _broadcast_parameters(self):
        """Rank 0's initial weights win: ranks agree even if their seeds or files differed."""
        if self.comm.size == 1:
            return
        for name, v in zip(self.names, self.vars):
            v.assign(self.comm.broadcast(v, root=0, name=f"init.{name}"))

    # flat views for the core's strategies ------------------------------------------------------
    def flat_params(self) -> np.ndarray:
        return self.flat.flatten([v.numpy() for v in self.vars])

    def set_flat_params(self, flat: np.ndarray) -> None:
        for v, a in zip(self.vars, self.flat.unflatten(flat).values()):
            v.assign(a)

    # training --------------------------------------------------------------------------------
    def _micro(self, x, y):
        """(k, b, T) stacks of the core's k micro-batches (it checks that k divides the batch)."""
        parts = aggregation.split_microbatches(np.asarray(x, np.int64), np.asarray(y, np.int64),
                                               self.cfg.aggregation.accumulation)
        return tf.constant(np.stack([p[0] for p in parts])), tf.constant(np.stack([p[1] for p in parts]))

    def _loss_and_grads(self, xs, ys):
        """Gradient of the mean loss over all k micro-batches (each contributes loss/k)."""
        k = self.cfg.aggregation.accumulation
        total, acc = tf.constant(0.0), None
        for i in range(k):  # k is fixed per run: unrolled once at trace time
            with tf.GradientTape() as tape:
                loss = self.model.loss(xs[i], ys[i], training=True) / k
            # wte's gradient mixes a gather (IndexedSlices) and a matmul: make every one dense
            g = [tf.convert_to_tensor(t) for t in tape.gradient(loss, self.vars)]
            acc = g if acc is None else [a + b for a, b in zip(acc, g)]
            total += loss
        return total, acc

    def _fold_loss(self) -> bool:
        """The loss rides in the gradients' fused message (one Horovod op per step instead of
        two: a second op costs a negotiation cycle, ~1 ms, a third of a tiny model's step);
        not when the wire is compressed or the op is adasum, where it is averaged on its own."""
        r = self.reduce
        return self.local is None and self.comm.size > 1 and r.compression == "none" and r.op != "adasum"

    def _train_step(self, xs, ys, lr):
        loss, grads = self._loss_and_grads(xs, ys)
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
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = tf.minimum(clip / (norm + 1e-6), 1.0)
            grads = [g * coef for g in grads]
        self.opt.apply(grads, lr)
        return loss, norm

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        xs, ys = self._micro(x, y)
        self.steps_done += 1
        if self.zero is not None:
            loss, grads = self._grads(xs, ys)
            new, norm = self.zero.step(self.flat.flatten([g.numpy() for g in grads]), self.flat_params(), lr)
            self.set_flat_params(new)
        else:
            loss, norm = self._train(xs, ys, tf.constant(lr, tf.float64))
            if self.local is not None and self.local.due(self.steps_done, self.cfg.train.steps):
                self.set_flat_params(self.local.sync(self.flat_params()))
        if self.comm.size > 1 and (self.zero is not None or not self._fold_loss()):
            loss = self.comm.allreduce(loss, op="average", name="loss")
        return StepResult(loss=float(loss), grad_norm=float(norm))

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, its flat gradient) with no communication: for strategies
        that move gradients themselves (parameter servers)."""
        loss, grads = self._grads(*self._micro(x, y))
        return float(loss), self.flat.flatten([g.numpy() for g in grads])

    # evaluation and metrics ------------------------------------------------------------------
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        loss_sum, correct = self._eval(_ids(x), _ids(y))
        return EvalResult(float(loss_sum), int(correct), int(np.asarray(y).size))

    def _evaluate(self, x, y):
        logits = self.model(x, training=False)
        n = tf.cast(tf.size(y), tf.float32)
        loss_sum = self.model.loss_from_logits(logits, y) * n
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(self.model.full_logits(logits), -1), y), tf.int64))
        return loss_sum, correct

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self.ncomm.allreduce(np.asarray(values, dtype=np.float64), op="sum", name="metrics")

    def optimizer_state_bytes(self) -> int:
        return self.zero.state_bytes() if self.zero is not None else self.opt.state_bytes()

    # state (state_dict is collective under ZeRO-1: every rank calls it) -----------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Whole parameters and AdamW moments (gathered under ZeRO-1 and tensor parallelism):
        loadable under any layout."""
        return gather_full(self._local_state(), self.tp)

    def shard_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """This rank's part of a sharded checkpoint (collective under ZeRO-1): its tp slices
        and where each sits in the whole array (checkpoint.py, placement.py). Under ZeRO-1 each
        dp rank returns the part of the moments it holds (nothing is gathered)."""
        if self.zero is not None:
            params = {n: v.numpy().copy() for n, v in zip(self.names, self.vars)}
            return self.zero.shard_state(params, tp_plan.placements(params, self.tp.size, self.tp.rank)
                                         if self.tp else None)
        local = self._local_state()
        return local, (tp_plan.placements(local, self.tp.size, self.tp.rank) if self.tp else {})

    def _local_state(self) -> dict[str, np.ndarray]:
        out = {n: v.numpy().copy() for n, v in zip(self.names, self.vars)}
        if self.zero is not None:
            st = self.zero.gather_state()
            m, v = self.flat.unflatten(st["m"]), self.flat.unflatten(st["v"])
            out.update({f"optim.m.{n}": m[n].copy() for n in m})
            out.update({f"optim.v.{n}": v[n].copy() for n in v})
            step = st["t"]
        else:
            step = int(self.opt.step.numpy())
            if step > 0:  # like torch: no moments before the first step
                out.update({f"optim.m.{n}": m.numpy().copy() for n, m in zip(self.names, self.opt.m)})
                out.update({f"optim.v.{n}": v.numpy().copy() for n, v in zip(self.names, self.opt.v)})
        out["optim.step"] = np.array(step, dtype=np.int64)
        if self.local is not None:
            out.update(self.local.state())
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state_dict; a state without optim.* keys loads parameters only."""
        if self.tp:  # this rank's slices of the whole arrays
            state = tp_plan.shard_state(state, self.tp.size, self.tp.rank)
        self.set_flat_params(self.flat.flatten({n: state[n] for n in self.names}))
        step = int(state.get("optim.step", 0))
        self.steps_done = step
        if step == 0 or f"optim.m.{self.names[0]}" not in state:
            return
        if self.zero is not None:   # (local SGD and ZeRO exclude each other: config.py)
            return self.zero.load_shard(state, step)
        for n, mv, vv in zip(self.names, self.opt.m, self.opt.v):
            mv.assign(np.asarray(state[f"optim.m.{n}"], np.float32))
            vv.assign(np.asarray(state[f"optim.v.{n}"], np.float32))
        self.opt.step.assign(step)
        if self.local is not None:
            self.local.load(state)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.vars)

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0) -> list[int]:
        """Sample with hvdllm.sampling (shared with torch): the last position's logits go to
        numpy float64; temperature, top-k and one inverse-CDF draw per token from
        np.random.default_rng(seed). Equal logits therefore give equal tokens in both backends."""
        def last_logits(ids):
            return self._logits(tf.constant([ids], tf.int64))[0, -1].numpy().astype(np.float64)
        return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole (unsharded) parameters, without optimizer state: tensor-parallel slices are
        gathered (collective over the tp group: each of its ranks calls this). For the snapshots
        that trainers send to evaluators and generators (hvdllm/strategies/roles.py)."""
        return gather_full({n: v.numpy() for n, v in zip(self.names, self.vars)}, self.tp)


def _ids(a) -> tf.Tensor:
    return tf.constant(np.asarray(a, dtype=np.int64))
