"""The built-in model in TensorFlow with the framework-neutral parameter layout of hvdllm.params:
GPT-2 or, with model.family = "llama", a Llama (RMSNorm, rotary embeddings, SwiGLU,
grouped-query attention), computing what torch_backend/model.py does.

Raw tf.Variables on a tf.Module, no Keras layers: Horovod cannot handle Keras 3 variables, and
the (in, out) weight layout must load the same numpy arrays the torch twin uses. Initial values
come from hvdllm.params.init_params (same seed, same weights in both frameworks).
"""
from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from hvdllm import params as params_mod
from hvdllm.params import init_params, n_layers, names_for_layers
from hvdllm.strategies import tensor_parallel as tp_plan

from .tensor_parallel import (
    TPGroup,
    copy_to_tp,
    gather_vocab,
    reduce_from_tp,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
    vocab_range,
)


def _bound(f, **kw):
    """f with its keyword arguments fixed and only tensors left positional (a tf.function of a
    functools.partial keeps the fixed ones in its signature, which experimental_get_compiler_ir
    then asks for)."""
    return lambda *tensors: f(*tensors, **kw)


class GPT(tf.Module):
    """The whole model, or (for a pipeline stage) only `layers`: 0 = embeddings, 1..L = blocks,
    L+1 = head. A partial model holds only its layers' parameters, under their global names.
    With a TPGroup, each parameter is this rank's tensor-parallel slice (see tensor_parallel.py).
    model_cfg.family picks the architecture (hvdllm/params.py); the class keeps its name."""

    def __init__(self, model_cfg, seed: int, dropout_seed: int | None = None, layers=None,
                 tp: TPGroup | None = None, materialise: bool = True):
        super().__init__(name="gpt")
        self.cfg = model_cfg
        self.layers = list(range(n_layers(model_cfg))) if layers is None else list(layers)
        self.tp = tp if tp is not None and tp.size > 1 else None
        n = self.tp.size if self.tp else 1
        self.n_head_local, self.width_local = model_cfg.n_head // n, model_cfg.n_embd // n
        self.llama = params_mod.is_llama(model_cfg)
        self.head = params_mod.head_name(model_cfg)
        self.eps = getattr(model_cfg, "norm_eps", 1e-5)
        if self.llama:
            self.n_kv_local, self.head_dim = params_mod.kv_heads(model_cfg) // n, params_mod.head_dim(model_cfg)
            self.rope_cos, self.rope_sin = (tf.constant(t) for t in params_mod.rope_tables(model_cfg))
        self.table = params_mod.table_vocab(model_cfg)   # vocab_size padded to model.vocab_multiple
        lo, hi = vocab_range(self.table, self.tp) if self.tp else (0, self.table)
        mask = params_mod.padded_vocab_mask(model_cfg, lo, hi)
        self.vocab_mask = None if mask is None else tf.constant(mask)   # padded logits never win
        names = names_for_layers(model_cfg, self.layers)
        # a tp rank's slice of a whole value (ZeRO-3 cuts its units' values with it too)
        self.cut = cut = (lambda k, v: tp_plan.shard(k, v, self.tp.size, self.tp.rank)) if self.tp else None
        if materialise:
            values = init_params(model_cfg, seed, names, cut)   # this rank's part only
            # Variable names may not contain '.' in every TF API, so the dict key is the real name.
            self.params = collections.OrderedDict(
                (n, tf.Variable(values.pop(n), name=n.replace(".", "_"), trainable=True)) for n in names)
        else:   # ZeRO-3 puts each unit's weights here while it runs, from its shards
            self.params = collections.OrderedDict((n, None) for n in names)
        # A stateful generator keeps dropout masks reproducible inside tf.function.
        self._rng = tf.random.Generator.from_seed(seed if dropout_seed is None else dropout_seed)

    # the engine's compute settings (configure): train.activation_checkpointing ('full' recomputes
    # each block in backward, 'selective' each block's attention core; dropout is refused with it,
    # config validation: the stateful generator would draw new masks) and train.precision
    checkpointing = "none"
    precision = "fp32"
    pieces = None   # train.compile under tp: {key: XLA function} of the blocks' pieces (_piece)

    def configure(self, train_cfg) -> None:
        self.checkpointing, self.precision = train_cfg.activation_checkpointing, train_cfg.precision
        if getattr(train_cfg, "compile", False) and self.tp:
            self.pieces = {}

    def _mm(self, a, b, transpose_b=False):
        """a @ b; under train.precision = 'bf16' / 'fp16' computed in 16 bits from copies of both,
        the result float32 again (TF has no autocast for tf.Module code: the matmuls are what
        Keras' mixed_bfloat16 policy would run in bfloat16; norms, softmax and the loss stay
        float32, as the variables, their gradients and the AdamW state do)."""
        if self.precision == "fp32":
            return tf.matmul(a, b, transpose_b=transpose_b)
        low = tf.bfloat16 if self.precision == "bf16" else tf.float16
        return tf.cast(tf.matmul(tf.cast(a, low), tf.cast(b, low), transpose_b=transpose_b), tf.float32)

    @staticmethod
    def _recomputed(f, *args):
        """f(*args), its activations not kept but computed again in backward (tf.recompute_grad;
        the variables f reads get their gradients too)."""
        return tf.recompute_grad(f)(*args)

    @property
    def variables_list(self) -> list[tf.Variable]:
        return list(self.params.values())

    adapters = None   # tf_backend/lora.Adapters when finetune.lora_rank > 0

    def p(self, name: str) -> tf.Variable:
        w = self.params[name]
        return w if self.adapters is None else self.adapters.weight(name, w)

    def _xw(self, x, name: str, training):
        """x @ p(name) for a linear weight; under finetune.lora_dropout > 0 in training unfolded,
        the adapters beside the frozen weight on a dropped-out input (lora.Adapters.side)."""
        if self.adapters is None or not self.adapters.beside(name, training):
            return self._mm(x, self.p(name))
        return self._mm(x, self.params[name]) + self.adapters.side(name, x, self._mm, self._drop)

    # building blocks ----------------------------------------------------------------------------
    def _ln(self, x, prefix):
        if self.llama:
            return self._rms(x, prefix)
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + self.eps) * self.p(prefix + ".weight") + self.p(prefix + ".bias")

    def _rms(self, x, prefix):
        """RMSNorm as Hugging Face's LlamaRMSNorm: in float32, the gain applied after."""
        h = tf.cast(x, tf.float32)
        h = h * tf.math.rsqrt(tf.reduce_mean(tf.square(h), axis=-1, keepdims=True) + self.eps)
        return self.p(prefix + ".weight") * tf.cast(h, x.dtype)

    def _linear(self, x, prefix, training=False):
        return self._xw(x, prefix + ".weight", training) + self.p(prefix + ".bias")

    def _dropout(self, x, training):
        if not training or self.cfg.dropout <= 0:
            return x
        return self._drop(x, self.cfg.dropout)

    def _drop(self, x, rate):
        """Inverted dropout at `rate` from the model's generator (model.dropout's and the adapters')."""
        keep = self._rng.uniform(tf.shape(x)) >= rate
        return tf.where(keep, x / (1.0 - rate), tf.zeros_like(x))

    def _attn(self, x, h, training):
        """This rank's partial product of attention's output projection (before g), from the
        tp-copied normed input x; so are _llama_attn's, _swiglu's and _mlp's (_block)."""
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        C, nh = self.width_local, self.n_head_local
        hd = C // nh
        q, k, v = tf.split(self._linear(x, h + "attn.c_attn", training), 3, axis=-1)
        q, k, v = (tf.transpose(tf.reshape(t, [B, T, nh, hd]), [0, 2, 1, 3]) for t in (q, k, v))
        y = tf.reshape(tf.transpose(self._attention_core(q, k, v, training), [0, 2, 1, 3]), [B, T, C])
        return self._xw(y, h + "attn.c_proj.weight", training)

    def _attention_core(self, q, k, v, training):
        """Causal softmax(q k^T / sqrt(hd)) v of (B, heads, T, hd), with attention dropout (gpt2)."""
        def core(q, k, v):
            T = tf.shape(q)[2]
            scores = self._mm(q, k, transpose_b=True) * (1.0 / float(np.sqrt(int(q.shape[-1]))))
            causal = tf.linalg.band_part(tf.ones([T, T], tf.bool), -1, 0)  # lower triangle incl. diagonal
            scores = tf.where(causal, scores, tf.constant(-np.inf, scores.dtype))
            return self._mm(self._dropout(tf.nn.softmax(scores, axis=-1), training), v)
        return self._recomputed(core, q, k, v) if self.checkpointing == "selective" else core(q, k, v)

    def _rope(self, t):
        """Rotary embedding of (B, heads, T, hd): HF's rotate_half over the two halves."""
        T, half = tf.shape(t)[2], self.head_dim // 2
        rotated = tf.concat([-t[..., half:], t[..., :half]], axis=-1)
        return t * self.rope_cos[:T] + rotated * self.rope_sin[:T]

    def _llama_attn(self, x, h, training=False):
        """Grouped-query attention: this rank's query heads and the key/value heads they share
        (query head j reads key/value head j // (n_head / n_kv_head), as HF's repeat_kv)."""
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        nh, nkv, hd = self.n_head_local, self.n_kv_local, self.head_dim

        def heads(name, n):
            return tf.transpose(tf.reshape(self._xw(x, h + name, training), [B, T, n, hd]), [0, 2, 1, 3])
        q, k, v = heads("attn.q.weight", nh), heads("attn.k.weight", nkv), heads("attn.v.weight", nkv)
        q, k = self._rope(q), self._rope(k)
        if nkv != nh:
            k, v = tf.repeat(k, nh // nkv, axis=1), tf.repeat(v, nh // nkv, axis=1)
        y = tf.reshape(tf.transpose(self._attention_core(q, k, v, False), [0, 2, 1, 3]), [B, T, nh * hd])
        return self._xw(y, h + "attn.o.weight", training)

    def _swiglu(self, x, h, training=False):
        a = tf.nn.silu(self._xw(x, h + "mlp.gate.weight", training)) * self._xw(x, h + "mlp.up.weight", training)
        return self._xw(a, h + "mlp.down.weight", training)

    def _mlp(self, x, h, training):
        x = tf.nn.gelu(self._linear(x, h + "mlp.c_fc", training), approximate=True)
        return self._xw(x, h + "mlp.c_proj.weight", training)

    def _residual(self, x, p, bias, norm, training):
        """x plus a sublayer's reduced output p (gpt2: with its bias and dropout), and (norm: the
        next norm's prefix) that norm of the sum."""
        x = x + (p if bias is None else self._dropout(p + self.p(bias), training))
        return x if norm is None else (x, self._ln(x, norm))

    def _piece(self, key, f):
        """f, or under train.compile with tp its XLA function (one per key, made at first use)."""
        if self.pieces is None:
            return f
        if key not in self.pieces:
            self.pieces[key] = tf.function(f, jit_compile=True, autograph=False)
        return self.pieces[key]

    def _block(self, i, x, training):
        """Block i: norm, f, attention's partial product, g, residual and the next norm, f, the
        MLP's partial product, g, residual. Under train.compile with tp the pieces between the
        collectives are XLA functions (_piece: five per block and training mode): XLA has no
        kernel for Horovod's ops, so f and g (and their gradients' allreduces) run between them,
        and the tape records each piece as one op whose gradient is compiled too."""
        h = f"h.{i - 1}."
        parts = ((self._llama_attn if self.llama else self._attn, None if self.llama else h + "attn.c_proj.bias",
                  h + "ln_2"),
                 (self._swiglu if self.llama else self._mlp, None if self.llama else h + "mlp.c_proj.bias", None))
        a = self._piece((i, "ln_1", training), _bound(self._ln, prefix=h + "ln_1"))(x)
        for k, (local, bias, norm) in enumerate(parts):
            p = self._piece((i, k, training), _bound(local, h=h, training=training))(copy_to_tp(a, self.tp))
            out = self._piece((i, k, "residual", training), _bound(
                self._residual, bias=bias, norm=norm, training=training))(x, reduce_from_tp(p, self.tp))
            x, a = out if norm is not None else (out, None)
        return x

    # model ---------------------------------------------------------------------------------------
    def run_layer(self, i: int, x, training=False):
        """Layer i: token ids -> hidden (i=0), hidden -> hidden (blocks), hidden -> logits (head)."""
        if i == 0:
            T = x.shape[1]
            if T is not None and T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.cfg.block_size}")
            T = tf.shape(x)[1]
            tok = (vocab_parallel_embedding(x, self.p("wte"), self.table, self.tp) if self.tp
                   else tf.gather(self.p("wte"), x))
            return tok if self.llama else self._dropout(tok + self.p("wpe")[:T], training)
        if i == self.cfg.n_layer + 1:  # logits (this rank's vocabulary slice under tp)
            x = copy_to_tp(self._ln(x, "ln_f"), self.tp)
            logits = self._mm(x, self.p(self.head), transpose_b=True)
            return logits if self.vocab_mask is None else logits + self.vocab_mask
        return self._block(i, x, training)

    def run_layers(self, layers, x, training=False):
        full = self.checkpointing == "full" and training
        for i in layers:
            if full and 1 <= i <= self.cfg.n_layer:
                x = self._recomputed(lambda h, i=i: self.run_layer(i, h, training), x)
            else:
                x = self.run_layer(i, x, training)
        return x

    def __call__(self, idx, training=False):
        """idx (B, T) int -> logits (B, T, vocab) float32 (a full model)."""
        return self.run_layers(self.layers, idx, training)

    def loss(self, idx, targets, training=False):
        """Mean cross-entropy over every token."""
        return self.loss_from_logits(self(idx, training=training), targets)

    def loss_from_logits(self, logits, targets):
        """Under tp from the vocabulary slices, never gathering the logits."""
        if self.tp:
            flat = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
            return vocab_parallel_cross_entropy(flat, tf.reshape(targets, [-1]), self.table, self.tp)
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        return tf.reduce_mean(per_token)

    def full_logits(self, logits):
        """Whole-vocabulary logits (evaluation's argmax, sampling)."""
        return gather_vocab(logits, self.tp) if self.tp else logits


__all__ = ["GPT"]
