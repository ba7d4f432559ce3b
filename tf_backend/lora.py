"""LoRA adapters in TensorFlow (hvdllm/lora.py writes what they compute): the model reads each
targeted weight as W + s * A^T B^T (GPT.p); only the adapters (and a classifier's head) get
gradients, so the base variables never change. Under finetune.lora_dropout > 0 a training forward
runs them beside the weight instead (GPT._xw): x @ W + s * (dropout(x) @ A^T) @ B^T, the mask
from the model's generator (GPT._rng, model.dropout's, whose state TF ZeRO-3's recompute restores)."""
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
        # the unfolded path in training: needed for a dropout (p > 0); a test sets it at p = 0 to
        # compare it with the folded one
        self.dropout = lora.dropout(cfg)
        self.unfold = self.dropout > 0

    def weight(self, name: str, w):
        if name not in self.targets:
            return w
        a, b = self.vars[lora.a_name(name)], self.vars[lora.b_name(name)]
        return w + self.scale * tf.matmul(a, b, transpose_a=True, transpose_b=True)

    def beside(self, name: str, training: bool) -> bool:
        """Does `name`'s product run unfolded (x @ W + side(x)) rather than through weight()?"""
        return self.unfold and training and name in self.targets

    def side(self, name: str, x, mm, drop):
        """s * (drop(x) @ A^T) @ B^T: the adapters' term of x @ (W + s A^T B^T), the input dropped
        (`mm` the model's matmul, for train.precision; `drop` its dropout, for its generator)."""
        a, b = self.vars[lora.a_name(name)], self.vars[lora.b_name(name)]
        if self.dropout:
            x = drop(x, self.dropout)
        return self.scale * mm(mm(x, a, transpose_b=True), b, transpose_b=True)


def attach(model, cfg) -> list:
    """Adapters on `model` (a GPT). Returns the trainable [(name, variable)]: the adapters, then
    a classifier's head."""
    model.adapters = Adapters(cfg)
    head = task.HEAD if task.is_classify(cfg) else ()
    return list(model.adapters.vars.items()) + [(n, model.params[n]) for n in head]
