"""A GPT in TensorFlow with the framework-neutral parameter layout of hvdllm.params.

Raw tf.Variables on a tf.Module, no Keras layers: Horovod cannot handle Keras 3 variables, and
the (in, out) weight layout must load the same numpy arrays the torch twin uses. Initial values
come from hvdllm.params.init_params (same seed, same weights in both frameworks).
"""
from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from hvdllm.params import init_params, param_shapes

LN_EPS = 1e-5


class GPT(tf.Module):
    def __init__(self, model_cfg, seed: int, dropout_seed: int | None = None):
        super().__init__(name="gpt")
        self.cfg = model_cfg
        values = init_params(model_cfg, seed)
        shapes = param_shapes(model_cfg.n_layer, model_cfg.n_embd, model_cfg.vocab_size,
                              model_cfg.block_size)
        # Variable names may not contain '.' in every TF API, so the dict key is the real name.
        self.params = collections.OrderedDict(
            (n, tf.Variable(values[n], name=n.replace(".", "_"), trainable=True)) for n in shapes)
        # A stateful generator keeps dropout masks reproducible inside tf.function.
        self._rng = tf.random.Generator.from_seed(seed if dropout_seed is None else dropout_seed)

    @property
    def variables_list(self) -> list[tf.Variable]:
        return list(self.params.values())

    def p(self, name: str) -> tf.Variable:
        return self.params[name]

    # building blocks ----------------------------------------------------------------------------
    def _ln(self, x, prefix):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + LN_EPS) * self.p(prefix + ".weight") + self.p(prefix + ".bias")

    def _linear(self, x, prefix):
        return tf.matmul(x, self.p(prefix + ".weight")) + self.p(prefix + ".bias")

    def _dropout(self, x, training):
        rate = self.cfg.dropout
        if not training or rate <= 0:
            return x
        keep = self._rng.uniform(tf.shape(x)) >= rate
        return tf.where(keep, x / (1.0 - rate), tf.zeros_like(x))

    def _attn(self, x, h, training):
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        C, nh = self.cfg.n_embd, self.cfg.n_head
        hd = C // nh
        q, k, v = tf.split(self._linear(x, h + "attn.c_attn"), 3, axis=-1)
        q, k, v = (tf.transpose(tf.reshape(t, [B, T, nh, hd]), [0, 2, 1, 3]) for t in (q, k, v))
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / float(np.sqrt(hd)))
        causal = tf.linalg.band_part(tf.ones([T, T], tf.bool), -1, 0)  # lower triangle incl. diagonal
        scores = tf.where(causal, scores, tf.constant(-np.inf, scores.dtype))
        att = self._dropout(tf.nn.softmax(scores, axis=-1), training)
        y = tf.reshape(tf.transpose(tf.matmul(att, v), [0, 2, 1, 3]), [B, T, C])
        return self._dropout(self._linear(y, h + "attn.c_proj"), training)

    def _mlp(self, x, h, training):
        x = tf.nn.gelu(self._linear(x, h + "mlp.c_fc"), approximate=True)
        return self._dropout(self._linear(x, h + "mlp.c_proj"), training)

    # model ---------------------------------------------------------------------------------------
    def __call__(self, idx, training=False):
        """idx (B, T) int -> logits (B, T, vocab) float32."""
        T = idx.shape[1]
        if T is not None and T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.cfg.block_size}")
        T = tf.shape(idx)[1]
        x = tf.gather(self.p("wte"), idx) + self.p("wpe")[:T]
        x = self._dropout(x, training)
        for i in range(self.cfg.n_layer):
            h = f"h.{i}."
            x = x + self._attn(self._ln(x, h + "ln_1"), h, training)
            x = x + self._mlp(self._ln(x, h + "ln_2"), h, training)
        x = self._ln(x, "ln_f")
        return tf.matmul(x, self.p("wte"), transpose_b=True)

    def loss(self, idx, targets, training=False):
        """Mean cross-entropy over every token."""
        logits = self(idx, training=training)
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        return tf.reduce_mean(per_token)


__all__ = ["GPT"]
