"""task.kind = 'classify' on the TensorFlow GPT: pooling, the head and the loss, as
hvdllm/task.py writes them (torch_backend/classify.py is the twin)."""
from __future__ import annotations

import tensorflow as tf

from hvdllm import task


class Classifier(task.ClassifierBase):
    """The head on `model` (a GPT built from hvdllm.task.model_config: it holds cls.weight and
    cls.bias). Batches as hvdllm/engine.py says: x (B, T) ids, y (B, 2) = [label, length]."""

    def __init__(self, model, task_cfg):
        super().__init__(model, task_cfg, tf.constant)

    def logits(self, x, y, training=False):
        return self.head_logits(self.model.run_layers(range(self.L + 1), x, training), y)

    def head_logits(self, hidden, y):
        """The head's layer (L + 1) on the blocks' output: final norm, pooling, cls (ZeRO-2/3's
        last unit runs it alone)."""
        h = self.model._ln(hidden, "ln_f")   # (B, T, C)
        lengths = y[:, 1]
        if self.pooling == "last":
            pooled = tf.gather(h, lengths - 1, axis=1, batch_dims=1)
        else:   # the real tokens' mean: padding masked out
            real = tf.cast(tf.range(tf.shape(h)[1], dtype=lengths.dtype)[None, :] < lengths[:, None], h.dtype)
            pooled = tf.reduce_sum(h * real[:, :, None], axis=1) / tf.cast(lengths[:, None], h.dtype)
        return tf.matmul(pooled, self.model.p("cls.weight")) + self.model.p("cls.bias")

    def _per_example(self, logits, labels):
        per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return per if self.weights is None else per * tf.gather(self.weights, labels)

    def loss(self, x, y, training=False):
        """The mean over the batch of the weighted per-example cross-entropy."""
        return tf.reduce_mean(self._per_example(self.logits(x, y, training), y[:, 0]))

    def loss_from_hidden(self, hidden, y):
        return tf.reduce_mean(self._per_example(self.head_logits(hidden, y), y[:, 0]))

    def evaluate(self, x, y):
        """(loss sum, correct, logits) as tensors (the engine traces it and makes the EvalResult)."""
        return self.evaluate_logits(self.logits(x, y, training=False), y)

    def evaluate_logits(self, logits, y):
        labels = y[:, 0]
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.int64))
        return tf.reduce_sum(self._per_example(logits, labels)), correct, logits
