"""The TensorFlow side of pipeline parallelism: this rank's model chunks, a GradientTape per
micro-batch (kept until that micro-batch's backward), and the optimizer step.

The schedule, the messages and their order are the core's (hvdllm/strategies/pipeline.py), the
same as torch_backend/pipeline.py: after the last backward, the tied-embedding gradient exchange
between the first and last pipeline ranks (p2p), one grouped allreduce of the gradients over this
stage's dp process set (Horovod), one allreduce of the squared gradient norm over the pipeline
(MPI) for global clipping; then AdamW. The loss is broadcast from the last stage.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import tensorflow as tf

from hvdllm import device, task
from hvdllm.engines import PipelineStageBase
from hvdllm.params import names_for_layers

from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .engine import Engine
from .model import GPT
from .optim import AdamW
from .tensor_parallel import norm_sq


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


class PipelineEngine(PipelineStageBase):
    """This rank's stage of the built-in GPT; the step itself is PipelineStageBase's."""

    def __init__(self, cfg, layout, rt, tp=None):
        layers = self._place(cfg, layout, rt, tp, measure_layer_times)
        self.model = GPT(task.model_config(cfg), cfg.train.seed, dropout_seed=cfg.train.seed + layout.rank,
                         layers=layers, tp=self.tp)
        self.model.configure(cfg.train)   # checkpointing, precision
        # task.kind = 'classify': the last stage's head layer is the Classifier's (it pools with the lengths)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.names, self.vars = list(self.model.params), list(self.model.params.values())
        self.named = list(zip(self.names, self.vars))
        self.chunk_names = [names_for_layers(task.model_config(cfg), c) for c in self.chunks]
        self.saved, self.grads = {}, {}
        # train.compile: each chunk's micro-batch forward (and the last stage's loss) is one XLA
        # function; the GradientTape around its call records it as one op, whose gradient TF
        # also builds as one XLA function (both carry _XlaMustCompile). The transport, Horovod's
        # allreduce, the norm and AdamW stay outside (they have no XLA kernels), as in Engine.
        fns = [functools.partial(self._chunk_forward, c) for c in range(len(self.chunks))]
        self.stage_fns = ([tf.function(f, jit_compile=True, autograph=False) for f in fns]
                          if cfg.train.compile else fns)
        self._strategies(Collectives(rt.process_set(layout.group("dp"))), NumpyCollectives,
                         lambda: AdamW(self.vars, cfg.optim))
        # activations cross to the next stage as numpy arrays; from a GPU, TensorFlow's .numpy()
        # and its tensor constructor copy through TF's own staging buffers
        device.log_transport(layout, "host arrays (TensorFlow copies from and to its GPU itself)"
                             if tf.config.list_logical_devices("GPU") else device.p2p_transport(False, False))

    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    assign = staticmethod(Engine.assign)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)
    optimizer_state = Engine.optimizer_state
    load_optimizer_state = Engine.load_optimizer_state

    def start_step(self):
        self.grads = {}

    def stage_grads(self) -> list:
        return [self.grads.get(n, tf.zeros_like(v)) for n, v in self.named]

    def norm_sq(self, named_grads) -> float:
        return float(norm_sq(named_grads, self.tp))

    def apply_update(self, grads, coef: float, lr: float) -> None:
        self.opt.apply([g * coef for g in grads], tf.constant(lr, tf.float64))

    # StageRunner --------------------------------------------------------------------------
    def _chunk_forward(self, chunk, x, y):
        """The chunk's layers on x; with targets y (the last chunk), the micro-batch's mean loss."""
        out = self.model.run_layers(self.body[chunk], x, training=True)
        if y is None:
            return out
        if self.head is not None:   # classify: [label, length] per example
            return self.head.loss_of(self.head.head(out, y), y)
        return self.model.loss_from_logits(out, y)

    def forward(self, chunk, mb, inp, target):
        x = from_host(inp)
        y = None if target is None else from_host(target)
        tape = tf.GradientTape()
        with tape:
            if self.chunks[chunk][0] != 0:
                tape.watch(x)
            out = self.stage_fns[chunk](x, y)
            if target is not None:   # outside XLA: fp16's loss scale changes between steps
                loss, out = out, self.backward_loss(out)
        self.saved[(mb, chunk)] = (tape, x, out)
        return float(loss) if target is not None else to_host(out)

    def backward(self, chunk, mb, grad):
        tape, x, out = self.saved.pop((mb, chunk))
        names = self.chunk_names[chunk]
        sources = [self.model.params[n] for n in names] + ([x] if self.chunks[chunk][0] != 0 else [])
        grads = tape.gradient(out, sources, output_gradients=None if grad is None else from_host(grad))
        for n, g in zip(names, grads):
            g = tf.convert_to_tensor(g)  # wte's gradient can be IndexedSlices (the gather)
            self.grads[n] = g if n not in self.grads else self.grads[n] + g
        return to_host(grads[-1]) if self.chunks[chunk][0] != 0 else None

    # evaluation and generation ---------------------------------------------------------------
    def forward_chunk(self, chunk, a) -> np.ndarray:
        return to_host(self.model.run_layers(self.body[chunk], from_host(a), training=False))

    def score(self, out, y):
        if self.head is not None:   # classify: loss sum, correct, examples, then the logits
            y = from_host(np.asarray(y, np.int64))
            loss_sum, correct, logits = self.head.scores(self.head.head(from_host(out), y), y)
            return np.concatenate([[float(loss_sum), int(correct), int(y.shape[0])], to_host(logits).reshape(-1)])
        logits, t = from_host(out), from_host(np.asarray(y).reshape(-1))
        full = tf.reshape(self.model.full_logits(logits), [-1, self.model.table])
        n = int(t.shape[0])
        return (float(self.model.loss_from_logits(tf.reshape(logits, [n, -1]), t)) * n,
                int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(full, -1), t), tf.int64))), n)

    def whole_model_logits(self, state):
        full = GPT(self.cfg.model, self.cfg.train.seed)
        for n, v in full.params.items():
            Engine.assign(v, state[n])

        def last_logits(ids):
            return to_host(full(from_host([ids], tf.int64))[0, -1]).astype(np.float64)
        return last_logits
