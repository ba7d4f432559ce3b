"""The TensorFlow ShardedSequentialEngine: a user's list of Keras layers (model.layers) under
ZeRO-2 / ZeRO-3, one unit per layer (hvdllm/strategies/zero_layers.py says what a unit is;
zero_sharded.py drives the step), eager, as tf_backend/sharded.py does for the built-in GPT.

ZeRO-2: the layers keep their Keras variables, whole; a unit's forward runs under its own
GradientTape, kept until the unit's backward. ZeRO-3: a Keras layer reads its weights through
its variables, so the unit's gathered weights are handed to it with keras.StatelessScope (the
scope maps each variable to a tensor: what the layer computes with, and what the tape watches);
after start-up each variable's backing tf.Variable is dropped (Keras' `_value`; any read outside
a scope then raises instead of computing with stale values). As tf_backend/sharded.py, the
forward runs without a tape and the backward recomputes the unit under one (a tape would hold the
gathered weights until the backward), and the next unit's gather is issued ahead on a thread
(sharded.py). Layers with non-trainable weights (a Dropout's seed state, batch statistics) are
refused: they are neither sharded nor reproducible under the recompute.
"""
from __future__ import annotations

import contextlib
import types

import keras
import numpy as np
import tensorflow as tf

from hvdllm import user_model
from hvdllm.strategies.zero_layers import ShardedLayersBase

from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .sequential import _loss, _run, _tf, _weights, build_layers, probe
from .sharded import ShardedEngine


def _freed(*_, **__):
    raise RuntimeError("parallel.zero = 3: this weight lives in the shards; read it inside the unit's "
                       "StatelessScope")


class ShardedSequentialEngine(ShardedLayersBase, ShardedEngine):
    """model.layers under parallel.zero = 2 or 3 (data parallel only)."""

    def __init__(self, cfg, layout, rt):
        self._groups(cfg, layout, Collectives(rt.process_set(layout.group("dp"))), None, NumpyCollectives)
        self.recompute = cfg.parallel.zero == 3
        self.layers = build_layers(cfg.model, cfg.train.seed, cfg.train.precision)
        _, names = probe(self.layers, cfg.model)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, keras.layers.Layer) and layer.non_trainable_weights:
                raise user_model.error(
                    f"layer {i} has non-trainable weights ({', '.join(w.name for w in layer.non_trainable_weights)}): "
                    f"parallel.zero = {cfg.parallel.zero} shards trainable weights only; set parallel.zero = 0 "
                    f"(or build the list without them)")
        self.names_per_layer = names
        self.vars = {n: w for i, layer in enumerate(self.layers) for n, w in zip(names[i], _weights(layer))}
        self.shapes = {n: tuple(w.shape) for n, w in self.vars.items()}
        self.param_shapes = dict(self.shapes)
        # ZeRO-3: the Keras variables themselves (their tf.Variables are dropped once sharded);
        # ZeRO-2: the tf.Variables, which the tape watches and the publish step assigns
        self.named = [(n, w if self.recompute else _tf(w)) for n, w in self.vars.items()]
        # sharded.py's primitives read and write the weights in model.params: ZeRO-2 the
        # tf.Variables, ZeRO-3 the gathered tensors of the units materialised now (else None)
        self.model = types.SimpleNamespace(params={n: None if self.recompute else _tf(w)
                                                   for n, w in self.vars.items()})
        self.table = {n: self.model.params for n in self.vars}   # where sharded.py's primitives read each
        self._gather_ahead()   # ZeRO-3: each unit's gather issued one unit ahead, as sharded.py's
        self._shard_layers()
        self._describe()

    def free_built(self, names) -> None:
        for n in names:   # Keras' own fields: the tf.Variable goes, a read outside a scope raises
            self.vars[n]._value = None
            self.vars[n]._initializer = _freed

    def _dropout_state(self):
        return None   # no generator of ours: the layers have no non-trainable state (checked above)

    def _run(self, u, x, target, training=True):
        """The unit's layers (ZeRO-3: inside a StatelessScope that maps each Keras variable to
        its gathered weight, what the recompute's tape watches), the last unit's loss / k."""
        scope = keras.StatelessScope([(self.vars[n], self.model.params[n]) for n in self.uses[u]]) \
            if self.recompute else contextlib.nullcontext()
        with scope:
            out = _run([self.layers[i] for i in self.unit_layers[u]], x, training)
        return out if target is None else _loss(out, target) / self.k

    def eval_unit(self, u, x):
        return self._run(u, x, None, training=False)

    def score(self, logits, y):
        t = from_host(np.asarray(y, np.int64))
        n = int(np.prod(t.shape))
        correct = int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), t), tf.int64)))
        return float(_loss(logits, t)) * n, correct, n

    def last_logits(self, ids) -> np.ndarray:
        return to_host(self.logits(np.array([ids], dtype=np.int64))[0, -1]).astype(np.float64)
