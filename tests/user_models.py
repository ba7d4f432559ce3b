"""Example `model.layers` builders (hvdllm/user_model.py): a small attention-free token LM as an
ordered list of layers, in torch and in Keras, with the same structure:

    0: token + position embedding   (B, T) int64 -> (B, T, C)
    1..L: residual block: x + W2 gelu(W1 LN(x)) + Wm causal_mean(x)   (position mixing, causal)
    L+1: final LayerNorm
    L+2: linear head -> logits (B, T, vocab)

Run with e.g. `--set model.layers=tests/user_models.py:torch_lm` (or `tests.user_models:keras_lm`).
"""
from __future__ import annotations


def torch_lm(cfg):
    import torch
    from torch import nn

    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
            nn.init.normal_(self.tok.weight, std=0.02)
            nn.init.normal_(self.pos.weight, std=0.02)

        def forward(self, idx):
            return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(C)
            self.fc, self.proj, self.mix = nn.Linear(C, 4 * C), nn.Linear(4 * C, C), nn.Linear(C, C)

        def forward(self, x):
            h = self.ln(x)
            mean = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
            return x + self.proj(nn.functional.gelu(self.fc(h))) + self.mix(mean)

    return [Embed(), *[Block() for _ in range(cfg.n_layer)], nn.LayerNorm(C), nn.Linear(C, V)]


def keras_lm(cfg):
    import keras
    import tensorflow as tf

    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size

    class Embed(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            init = keras.initializers.RandomNormal(stddev=0.02)
            self.tok = keras.layers.Embedding(V, C, embeddings_initializer=init)
            self.pos = keras.layers.Embedding(T, C, embeddings_initializer=init)

        def call(self, idx):
            return self.tok(idx) + self.pos(tf.range(tf.shape(idx)[1]))[None]

    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.ln = keras.layers.LayerNormalization(epsilon=1e-5)
            self.fc, self.proj, self.mix = keras.layers.Dense(4 * C), keras.layers.Dense(C), keras.layers.Dense(C)

        def call(self, x):
            h = self.ln(x)
            n = tf.cast(tf.range(1, tf.shape(x)[1] + 1), x.dtype)[None, :, None]
            return x + self.proj(tf.nn.gelu(self.fc(h), approximate=False)) + self.mix(tf.cumsum(h, 1) / n)

    return [Embed(), *[Block() for _ in range(cfg.n_layer)], keras.layers.LayerNormalization(epsilon=1e-5),
            keras.layers.Dense(V)]


def broken(cfg):
    raise RuntimeError("weights file /nonexistent/w.bin not found")
