"""Tensor-parallel building blocks for TensorFlow: Megatron-LM's f / g operators as
tf.custom_gradient functions, the vocabulary-parallel embedding and cross-entropy. The split of each
parameter is the core's (hvdllm/strategies/tensor_parallel.py); collectives go over the tp set.
Same names and semantics as torch_backend/tensor_parallel.py.
"""
from __future__ import annotations

import tensorflow as tf

from .collectives import Collectives


class TPGroup:
    """The tp group's collectives plus a count of allreduces per direction (2+2 per block)."""

    def __init__(self, collectives: Collectives):
        self.coll = collectives
        self.size, self.rank = collectives.size, collectives.rank
        self.counts = {"forward": 0, "backward": 0}

    def allreduce(self, t, direction: str, op: str = "sum"):
        self.counts[direction] += 1
        return self.coll.allreduce(t, op=op)


def copy_to_tp(x, group: TPGroup | None):
    """f: identity forward, allreduce(sum) of the gradient backward."""
    if group is None:
        return x

    @tf.custom_gradient
    def f(x):
        return tf.identity(x), lambda g: group.allreduce(g, "backward")
    return f(x)


def reduce_from_tp(x, group: TPGroup | None):
    """g: allreduce(sum) forward, identity backward."""
    if group is None:
        return x

    @tf.custom_gradient
    def g(x):
        return group.allreduce(x, "forward"), lambda dy: dy
    return g(x)


def vocab_range(vocab: int, group: TPGroup) -> tuple[int, int]:
    n = vocab // group.size
    return group.rank * n, (group.rank + 1) * n


def vocab_parallel_embedding(ids, wte_shard, vocab: int, group: TPGroup):
    """Rows this rank owns are looked up, others are zero; the sum over ranks is the embedding."""
    lo, hi = vocab_range(vocab, group)
    ids = tf.cast(ids, tf.int64)
    mine = tf.logical_and(ids >= lo, ids < hi)
    local = tf.gather(wte_shard, tf.clip_by_value(ids - lo, 0, hi - lo - 1))
    return reduce_from_tp(local * tf.cast(mine, local.dtype)[..., None], group)


def vocab_parallel_cross_entropy(logits, targets, vocab: int, group: TPGroup):
    """Mean cross-entropy from vocabulary slices (N, V/tp), never gathering them: allreduces of
    (N,) tensors only. Backward is local: (softmax - onehot) / N on each rank's slice."""
    lo, hi = vocab_range(vocab, group)
    targets = tf.cast(targets, tf.int64)
    mine = tf.logical_and(targets >= lo, targets < hi)
    idx = tf.clip_by_value(targets - lo, 0, hi - lo - 1)

    @tf.custom_gradient
    def ce(logits):
        gmax = tf.stop_gradient(group.coll.allreduce(tf.reduce_max(logits, -1), op="max"))
        shifted = logits - gmax[:, None]
        exp = tf.exp(shifted)
        sum_exp = group.allreduce(tf.reduce_sum(exp, -1), "forward")
        picked = tf.gather(shifted, idx, batch_dims=1) * tf.cast(mine, logits.dtype)
        target_logit = group.allreduce(picked, "forward")
        loss = tf.reduce_mean(tf.math.log(sum_exp) - target_logit)

        def grad(dy):
            softmax = exp / sum_exp[:, None]
            onehot = tf.one_hot(idx, hi - lo, dtype=logits.dtype) * tf.cast(mine, logits.dtype)[:, None]
            n = tf.cast(tf.shape(logits)[0], logits.dtype)
            return (softmax - onehot) * (dy / n)
        return loss, grad
    return ce(logits)


def gather_vocab(logits, group: TPGroup):
    """Whole-vocabulary logits (argmax in evaluation, sampling): an allgather of the last axis."""
    flat = tf.transpose(tf.reshape(logits, [-1, tf.shape(logits)[-1]]))   # (V/tp, N)
    full = tf.transpose(group.coll.allgather(flat))                          # (N, V)
    return tf.reshape(full, tf.concat([tf.shape(logits)[:-1], [-1]], 0))


def norm_sq(named_grads, group: TPGroup | None):
    """Squared global gradient norm: sharded parameters summed over the tp group, replicated ones
    (identical on every tp rank) counted once."""
    from hvdllm.strategies.tensor_parallel import style
    zero = tf.zeros([], tf.float64)
    sharded = tf.add_n([zero] + [tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for n, g in named_grads
                                  if style(n) != "replicate"])
    replicated = tf.add_n([zero] + [tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for n, g in named_grads
                                     if style(n) == "replicate"])
    if group is not None:
        sharded = group.coll.allreduce(tf.reshape(sharded, [1]), op="sum", name="tp.normsq")[0]
    return sharded + replicated
