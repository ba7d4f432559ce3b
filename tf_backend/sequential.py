"""A user's ordered list of Keras layers / callables (model.layers, see hvdllm/user_model.py) under
data and pipeline parallelism: the TensorFlow twin of torch_backend/sequential.py.

Every rank builds the whole list after seeding (keras.utils.set_random_seed(train.seed)) and runs
one probe forward (B=2, T=block_size), which creates every Keras weight in the same order on every
rank and checks that the last layer returns logits. The list is split over the pipeline with
parallel.partition and each rank keeps its chunks. Per micro-batch one tf.GradientTape, kept until
that micro-batch's backward; after the last backward one grouped allreduce of this stage's
gradients over its dp process set (Horovod), one allreduce of the squared gradient norm over the
pipeline (MPI) for global clipping, and AdamW (tf_backend.engine.AdamW). With parallel.pp = 1 it
is plain data parallelism over aggregation.accumulation micro-batches. With parallel.tp > 1,
model.tp_plan swaps the Dense layers it names for column / row-parallel ones (tf_backend/user_tp.py),
with the same gradient, norm and checkpoint rules as torch_backend/sequential.py.

Keras 3 variables are keras.Variable objects wrapping tf.Variables: the engine works on their
`.value` (the tf.Variable) and hands Horovod only plain tensors.
"""
from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from hvdllm import aggregation, user_model
from hvdllm.engine import StepResult
from hvdllm.engines import SequentialBase
from hvdllm.loss_scale import LossScaler
from hvdllm.strategies import pipeline as pl

from . import user_tp
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .optim import AdamW


def _seed(seed: int) -> None:
    keras.utils.set_random_seed(seed)


def _call(layer, x, training: bool):
    return layer(x, training=training) if isinstance(layer, keras.layers.Layer) else layer(x)


def _run(layers, x, training: bool):
    """The layers in order; a 16-bit output (Keras' 'mixed_bfloat16' / 'mixed_float16' policy,
    train.precision = 'bf16' / 'fp16') back in float32: the loss, and a pipeline stage's activation
    on the wire, stay float32."""
    for layer in layers:
        x = _call(layer, x, training)
    return tf.cast(x, tf.float32) if x.dtype in (tf.float16, tf.bfloat16) else x


def _tf(v):
    """The tf.Variable behind a keras.Variable (or the variable itself)."""
    return getattr(v, "value", v) if isinstance(v, keras.Variable) else v


def _weights(layer) -> list:
    return list(layer.weights) if isinstance(layer, keras.layers.Layer) else []


def _loss(logits, target):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target,
                                                                         logits=tf.cast(logits, tf.float32)))


def build_layers(model_cfg, seed: int, precision: str = "fp32") -> list:
    """The builder's layers; train.precision = 'bf16' / 'fp16' builds them under Keras'
    'mixed_bfloat16' / 'mixed_float16' policy (float32 variables, 16-bit computation: what the
    built-in GPT's casts do), which a layer keeps from its construction on."""
    policy = keras.config.dtype_policy()
    mixed = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}.get(precision)
    if mixed:
        keras.config.set_dtype_policy(mixed)
    try:
        built = user_model.build(model_cfg, seed, _seed)
    finally:
        keras.config.set_dtype_policy(policy)
    layers = user_model.as_list(built, (keras.Sequential,))
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise user_model.error(f"layer {i} is a {type(layer).__name__}, not a Keras layer or callable")
    return layers


def probe(layers, model_cfg) -> tuple[list, list[list[str]]]:
    """One forward of a (2, block_size) token batch, which creates every Keras weight (in list
    order, identically on every rank) and checks the contract (one tensor per layer, logits
    last, no weight shared by two layers). Returns (each layer's input activation and the
    logits, each layer's weight names '{layer}.{name}' in `layer.weights` order)."""
    x = from_host(np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, model_cfg.block_size)), tf.int64)
    inputs = [x]
    for i, layer in enumerate(layers):
        out = _call(layer, inputs[-1], False)
        if not tf.is_tensor(out):
            raise user_model.error(f"layer {i} returned a {type(out).__name__}, not one tensor")
        inputs.append(out)
    user_model.check_logits(tuple(inputs[-1].shape), model_cfg.vocab_size)
    owners, names = {}, []
    for i, layer in enumerate(layers):
        ws = _weights(layer)
        for w in ws:
            owners.setdefault(id(_tf(w)), []).append(i)
        names.append(user_model.unique_names(i, [w.name.split("/")[-1].split(":")[0] for w in ws]))
    user_model.check_not_shared(owners)
    return inputs, names


def measure_layer_times(layers, inputs) -> list[float]:
    """Forward+backward seconds per layer (best of 3), each from its real input activation."""
    times = []
    for layer, inp in zip(layers, inputs):
        sources = [_tf(v) for v in (layer.trainable_variables if isinstance(layer, keras.layers.Layer) else [])]
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with tf.GradientTape() as tape:
                if inp.dtype.is_floating:
                    tape.watch(inp)
                y = tf.reduce_mean(tf.square(tf.cast(_call(layer, inp, False), tf.float32)))
            tape.gradient(y, sources + ([inp] if inp.dtype.is_floating else []))
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


class SequentialEngine(SequentialBase):
    """A user's layer list under dp, pp and tp (see the module docstring)."""

    def __init__(self, cfg, layout, rt):
        self._settings(cfg, layout)
        m = cfg.model
        layers = build_layers(m, cfg.train.seed, cfg.train.precision)
        inputs, names = probe(layers, m)
        self.param_shapes = {n: tuple(w.shape) for i, layer in enumerate(layers)
                             for n, w in zip(names[i], _weights(layer))}
        self._place_on_pipeline(rt, [float(sum(int(np.prod(w.shape)) for w in _weights(layer))) for layer in layers],
                                lambda: measure_layer_times(layers, inputs[:-1]))
        n_layers = len(layers)
        mine = sorted(i for c in self.chunks for i in c)
        self.layers = {i: layers[i] for i in mine}  # the other ranks' layers are dropped
        self.tp, by_id = user_tp.apply(cfg, layout, rt, layers, self.layers, inputs)
        layers = inputs = None   # the other ranks' layers and the probe's activations are freed
        # every weight (checkpointed) and the trainable ones (optimised), as tf.Variables
        self.state_vars = [(n, _tf(w)) for i in mine for n, w in zip(names[i], _weights(self.layers[i]))]
        placements = {n: by_id[id(w)] for i in mine for n, w in zip(names[i], _weights(self.layers[i]))
                      if id(w) in by_id}
        # tp-split weight names (a row-parallel bias has a placement entry of None: replicated)
        self.split = {n for n, pl in placements.items() if pl is not None}
        self.placements = user_model.with_moments(placements)
        trainable = {id(_tf(w)) for i in mine if isinstance(self.layers[i], keras.layers.Layer)
                     for w in self.layers[i].trainable_variables}
        self.names = [n for n, v in self.state_vars if id(v) in trainable]
        self.vars = [v for n, v in self.state_vars if id(v) in trainable]
        self.named = list(zip(self.names, self.vars))
        self.chunk_vars = []
        for c in self.chunks:
            ids = {id(_tf(w)) for i in c for w in _weights(self.layers[i])}
            self.chunk_vars.append([k for k, v in enumerate(self.vars) if id(v) in ids])
        self.comm = Collectives(rt.process_set(layout.group("dp")))
        self.ncomm = NumpyCollectives(self.comm)
        self._broadcast_parameters()
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.opt = AdamW(self.vars, cfg.optim)
        self.scaler = LossScaler() if cfg.train.precision == "fp16" else None   # user_model.clip_or_skip
        self.saved, self.grads = {}, {}
        self._describe(n_layers)

    def _broadcast_parameters(self):
        """The dp group's first rank's weights win (one message), should a builder not be seeded."""
        if self.comm.size == 1 or not self.state_vars:
            return
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for _, v in self.state_vars], 0)
        flat = self.comm.broadcast(flat, root=0, name="seq.init").numpy()
        at = 0
        for _, v in self.state_vars:
            n = int(np.prod(v.shape))
            v.assign(flat[at:at + n].reshape(v.shape).astype(v.dtype.as_numpy_dtype))
            at += n

    def _run_chunk(self, chunk, x, training):
        return _run([self.layers[i] for i in self.chunks[chunk]], x, training)

    # StageRunner (pipeline) -------------------------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        x = from_host(inp)
        first = self.chunks[chunk][0] == 0
        tape = tf.GradientTape()
        with tape:
            if not first:
                tape.watch(x)
            out = self._run_chunk(chunk, x, True)
            if target is not None:
                loss = _loss(out, from_host(target))
                out = user_model.scaled(self, loss / self.m)
        self.saved[(mb, chunk)] = (tape, x, out)
        return float(loss) if target is not None else to_host(out)

    def backward(self, chunk, mb, grad):
        tape, x, out = self.saved.pop((mb, chunk))
        idx = self.chunk_vars[chunk]
        first = self.chunks[chunk][0] == 0
        sources = [self.vars[k] for k in idx] + ([] if first else [x])
        grads = tape.gradient(out, sources, output_gradients=None if grad is None else from_host(grad))
        self._accumulate(idx, grads)
        return None if first else to_host(grads[-1])

    def _accumulate(self, idx, grads):
        for k, g in zip(idx, grads):
            if g is None:  # a weight this micro-batch did not use
                continue
            g = tf.convert_to_tensor(g)  # an embedding's gradient is IndexedSlices
            self.grads[k] = g if k not in self.grads else self.grads[k] + g

    # one optimizer step -------------------------------------------------------------------------
    def train_step(self, x, y, lr) -> StepResult:
        self.grads = {}
        self._step_scale()   # fp16: the scale, or the testing aid's overflow on this rank
        norm = []
        if self.pipe is not None:
            loss = self.pipe.run(self, np.split(x, self.m), np.split(y, self.m),
                                 lambda: norm.append(self._reduce_and_step(lr)))
        else:
            loss = 0.0
            for xm, ym in aggregation.split_microbatches(x, y, self.m):
                with tf.GradientTape() as tape:
                    part = _loss(self._run_chunk(0, from_host(xm), True), from_host(ym)) / self.m
                    start = user_model.scaled(self, part)
                self._accumulate(range(len(self.vars)), tape.gradient(start, self.vars))
                loss += float(part)
            norm.append(self._reduce_and_step(lr))
        mean = self.comm.allreduce(from_host([loss], tf.float64), op="average", name="seq.loss")
        skipped = user_model.update_scaler(self.scaler, norm[0])
        return StepResult(loss=float(mean[0]), grad_norm=norm[0], skipped=skipped)

    def _reduce_and_step(self, lr) -> float:
        grads = [self.grads.get(k, tf.zeros_like(v)) for k, v in enumerate(self.vars)]
        user_model.inject_overflow(self, grads)
        if self.comm.size > 1 and grads:
            grads = self.comm.grouped_allreduce(grads, name="seq.grads", **self.reduce.kwargs())
        sq = user_model.grad_norm_sq(((n, float(tf.reduce_sum(tf.square(tf.cast(g, tf.float64)))))
                                      for n, g in zip(self.names, grads)), self.split, user_tp.tp_sum(self.tp))
        if self.pipe is not None:
            sq = pl.allreduce_sum(self.pp_comm, sq, self.timeout, "pipeline grad-norm allreduce")
        norm, coef = user_model.clip_or_skip(float(np.sqrt(sq)), self.cfg.optim.grad_clip, self.scaler)
        if coef is None:   # fp16: an overflow somewhere in the job, which every rank sees: no update
            return norm
        if grads:
            self.opt.apply([g * coef for g in grads], from_host(lr, tf.float64))
        return norm

    # evaluation ---------------------------------------------------------------------------------
    def _forward_all(self, x: np.ndarray):
        """Logits (numpy) of the whole list on the last stage's owner, None elsewhere."""
        if self.pipe is None:
            return to_host(self._run_chunk(0, from_host(x), False))
        return self.pipe.forward_only(lambda c, a: to_host(self._run_chunk(c, from_host(a), False)), x)

    def score(self, out, y) -> tuple[float, int, int]:
        return float(_loss(from_host(out), from_host(y))) * y.size, int((out.argmax(-1) == y).sum()), y.size

    # state: "{layer}.{name}", gathered over the pipeline so a checkpoint is the whole model ---
    def _local_state(self) -> dict:
        local = {n: to_host(v) for n, v in self.state_vars}   # every weight, trainable or not
        local.update(self.optimizer_state())
        return local

    def load_state_dict(self, state) -> None:
        """From whole arrays (a dict) or a checkpoint.Sharded: this rank's slices."""
        names = [n for n, _ in self.state_vars]
        state = user_model.load_slices(state, names, self.names, self.param_shapes, self.placements,
                                       self.cfg.model.layers)
        for n, v in self.state_vars:
            v.assign(np.asarray(state[n], v.dtype.as_numpy_dtype))
        step = int(state.get("optim.step", 0))
        if step and all(f"optim.m.{n}" in state for n in self.names):
            self.opt.load(self.names, state, step)

    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    tp_allgather = staticmethod(user_tp.allgather)

    def optimizer_state(self) -> dict:
        return self.opt.state(self.names)
