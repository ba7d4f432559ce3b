"""AdamW on tf.Variables with torch.optim.AdamW's arithmetic (used by every TensorFlow engine)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdllm.params import decays

from .collectives import to_host


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

    def state(self, names) -> dict[str, np.ndarray]:
        """The neutral checkpoint names; like torch, no moments before the first step."""
        step = int(self.step.numpy())
        out = {}
        if step > 0:
            out.update({f"optim.m.{n}": to_host(m) for n, m in zip(names, self.m)})
            out.update({f"optim.v.{n}": to_host(v) for n, v in zip(names, self.v)})
        out["optim.step"] = np.array(step, dtype=np.int64)
        return out

    def load(self, names, state, step: int) -> None:
        for n, mv, vv in zip(names, self.m, self.v):
            mv.assign(np.asarray(state[f"optim.m.{n}"], np.float32))
            vv.assign(np.asarray(state[f"optim.v.{n}"], np.float32))
        self.step.assign(step)
