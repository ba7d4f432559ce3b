"""LoRA adapters in TensorFlow (hvdllm/lora.py writes what they compute): the model reads each
targeted weight as W + s * A^T B^T (GPT.p); only the adapters (and a classifier's head) get
gradients, so the base variables never change."""
from __future__ import annotations

import tensorflow as tf

from hvdllm import lora, task


class Adapters(tf.Module):
    def __init__(self, cfg):
        super().__init__(name="lora")
        values = lora.init_adapters(cfg)
        self.scale = lora.scale(cfg)
        self.vars = {n: tf.Variable(v, name=n.replace(".", "_"), trainable=True) for n, v in values.items()}
        self.targets = set(lora.targets(cfg))

    def weight(self, name: str, w):
        if name not in self.targets:
            return w
        a, b = self.vars[lora.a_name(name)], self.vars[lora.b_name(name)]
        return w + self.scale * tf.matmul(a, b, transpose_a=True, transpose_b=True)


def attach(model, cfg) -> list:
    """Adapters on `model` (a GPT). Returns the trainable [(name, variable)]: the adapters, then
    a classifier's head."""
    model.adapters = Adapters(cfg)
    head = task.HEAD if task.is_classify(cfg) else ()
    return list(model.adapters.vars.items()) + [(n, model.params[n]) for n in head]
