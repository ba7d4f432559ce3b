"""The built-in model in PyTorch with the framework-neutral parameter layout of hvdllm.params:
GPT-2 or, with model.family = "llama", a Llama (RMSNorm, rotary embeddings, SwiGLU,
grouped-query attention; computed as Hugging Face's LlamaModel does).

Weights are (in, out) and applied as x @ W + b, so the same numpy arrays load into the
TensorFlow twin; initial values come from hvdllm.params.init_params (same seed, same weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hvdllm import params as params_mod
from hvdllm.params import init_params, n_layers, names_for_layers
from hvdllm.strategies import tensor_parallel as tp_plan

from . import collectives
from .tensor_parallel import (
    TPGroup,
    copy_to_tp,
    gather_vocab,
    reduce_from_tp,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
    vocab_range,
)


def _storageless(shape) -> torch.Tensor:
    """A float32 tensor of `shape` whose storage has 0 bytes (ZeRO-3's freed state; the untouched
    allocation of torch.empty is returned before any page of it is written)."""
    t = torch.empty(shape)
    t.untyped_storage().resize_(0)
    return t


class GPT(nn.Module):
    """The whole model, or (for a pipeline stage) only `layers`: 0 = embeddings, 1..L = blocks,
    L+1 = head. A partial model holds only its layers' parameters, under their global names.
    With a TPGroup, each parameter is this rank's tensor-parallel slice (see tensor_parallel.py).
    model_cfg.family picks the architecture (hvdllm/params.py); the class keeps its name."""

    def __init__(self, model_cfg, seed: int, layers=None, tp: TPGroup | None = None, materialise: bool = True):
        super().__init__()
        self.adapters = None   # torch_backend/lora.Adapters when finetune.lora_rank > 0
        self.cfg = model_cfg
        self.tp = tp if tp is not None and tp.size > 1 else None
        n = self.tp.size if self.tp else 1
        self.n_head_local, self.width_local = model_cfg.n_head // n, model_cfg.n_embd // n
        self.llama = params_mod.is_llama(model_cfg)
        self.head = params_mod.head_name(model_cfg)
        self.eps = getattr(model_cfg, "norm_eps", 1e-5)
        if self.llama:
            self.n_kv_local, self.head_dim = params_mod.kv_heads(model_cfg) // n, params_mod.head_dim(model_cfg)
            cos, sin = params_mod.rope_tables(model_cfg)
            # buffers, not parameters: they move with the module but are never trained or saved
            self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
            self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)
        self.table = params_mod.table_vocab(model_cfg)   # vocab_size padded to model.vocab_multiple
        lo, hi = vocab_range(self.table, self.tp) if self.tp else (0, self.table)
        mask = params_mod.padded_vocab_mask(model_cfg, lo, hi)
        # padded logits never win; a buffer moves with the module, is never trained or saved
        self.register_buffer("vocab_mask", None if mask is None else torch.from_numpy(mask), persistent=False)
        self.layers = list(range(n_layers(model_cfg))) if layers is None else list(layers)
        # ParameterDict keys may not contain '.', so parameters live in a list and names map to it.
        self.names = names_for_layers(model_cfg, self.layers)
        # a tp rank's slice of a whole value (ZeRO-3 cuts its units' values with it too)
        self.cut = cut = (lambda k, v: tp_plan.shard(k, v, self.tp.size, self.tp.rank)) if self.tp else None
        if materialise:
            values = init_params(model_cfg, seed, self.names, cut)   # this rank's part only
            self.plist = nn.ParameterList([nn.Parameter(torch.from_numpy(values.pop(n))) for n in self.names])
        else:   # ZeRO-3 fills the parameters unit by unit from its shards: no values drawn here
            shapes = params_mod.param_shapes(model_cfg)
            shapes = tp_plan.local_shapes(shapes, self.tp.size) if self.tp else shapes
            self.plist = nn.ParameterList([nn.Parameter(_storageless(shapes[n])) for n in self.names])
        self.index = {n: i for i, n in enumerate(self.names)}
        if collectives.DEVICE is not None:   # train.device: parameters and buffers live there
            self.to(collectives.DEVICE)

    # the engine's compute settings (configure): train.activation_checkpointing ('full' recomputes
    # each block in backward, 'selective' each block's attention core) and train.precision
    checkpointing = "none"
    precision = "fp32"
    compiled_block = None

    def configure(self, train_cfg) -> None:
        self.checkpointing, self.precision = train_cfg.activation_checkpointing, train_cfg.precision
        if train_cfg.compile:
            # train.compile: each block's run_layer compiled on its own (per block, not the whole
            # model: a pipeline stage compiles only the blocks it holds, and checkpointing's
            # recomputation wraps a compiled block). Dynamo specialises on the block index and
            # on training / evaluation (self.training and grad mode are guarded): two graphs per
            # block, and the recompile limit must not send later blocks back to eager. Under tp
            # each collective is a graph break (tensor_parallel.py): dynamo compiles the pieces
            # between them as frames of their own, and _row_linear's runs twice per block (the
            # attention's and the MLP's prefix), so up to four entries per block on one code
            # object. ZeRO-3's parameters change storage between calls (husks, views into each
            # gathered vector, set through .data): guards read shapes, strides and dtypes, not
            # storage, and the compiled code reads each parameter's storage at each call.
            import torch._dynamo.config as dynamo_cfg
            dynamo_cfg.recompile_limit = max(dynamo_cfg.recompile_limit, 4 * (self.cfg.n_layer + 1))
            self.compiled_block = torch.compile(self.run_layer)

    def p(self, name: str) -> torch.Tensor:
        w = self.plist[self.index[name]]
        return w if self.adapters is None else self.adapters.weight(name, w)

    def _beside(self, name: str) -> bool:
        """finetune.lora_dropout > 0 in training: `name`'s adapters run beside it (lora.Adapters.side)."""
        return self.adapters is not None and self.adapters.beside(name, self.training)

    def _xw(self, x, name: str) -> torch.Tensor:
        """x @ p(name) for a linear weight; unfolded when the adapters' input is dropped out."""
        if not self._beside(name):
            return x @ self.p(name)
        return x @ self.plist[self.index[name]] + self.adapters.side(name, x)

    @staticmethod
    def _recomputed(f, *args):
        """f(*args), its activations not kept but computed again in backward (non-reentrant
        torch.utils.checkpoint restores the RNG state: dropout draws the same masks)."""
        return checkpoint(f, *args, use_reentrant=False) if torch.is_grad_enabled() else f(*args)

    def named(self):
        """(name, parameter) in canonical order."""
        return [(n, self.plist[i]) for i, n in enumerate(self.names)]

    def _ln(self, x, prefix):
        if self.llama:
            return self._rms(x, prefix)
        return F.layer_norm(x, (x.shape[-1],), self.p(prefix + ".weight"), self.p(prefix + ".bias"), self.eps)

    def _rms(self, x, prefix):
        """RMSNorm as Hugging Face's LlamaRMSNorm: in float32, the gain applied after."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.p(prefix + ".weight") * h.to(x.dtype)

    def _linear(self, x, prefix):
        name = prefix + ".weight"
        if self._beside(name):
            return self._xw(x, name) + self.p(prefix + ".bias")
        return torch.addmm(self.p(prefix + ".bias"), x.reshape(-1, x.shape[-1]),
                           self.p(name)).view(*x.shape[:-1], -1)

    def _row_linear(self, x, prefix):
        """Row-parallel under tp: partial products summed over the group (g), then the bias."""
        y = reduce_from_tp(self._xw(x, prefix + ".weight"), self.tp)
        return y + self.p(prefix + ".bias")

    def _attn(self, x, h):
        B, T, _ = x.shape
        nh, C = self.n_head_local, self.width_local
        q, k, v = self._linear(copy_to_tp(x, self.tp), h + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        drop = self.cfg.dropout if self.training else 0.0
        y = self._attention_core(q, k, v, drop)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self._dropout(self._row_linear(y, h + "attn.c_proj"))

    def _attention_core(self, q, k, v, drop: float):
        def core(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return self._recomputed(core, q, k, v) if self.checkpointing == "selective" else core(q, k, v)

    def _rope(self, t):
        """Rotary embedding of (B, heads, T, hd): HF's rotate_half over the two halves."""
        T, half = t.shape[2], t.shape[-1] // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * self.rope_cos[:T] + rotated * self.rope_sin[:T]

    def _llama_attn(self, x, h):
        """Grouped-query attention: this rank's query heads and the key/value heads they share
        (query head j reads key/value head j // (n_head / n_kv_head), as HF's repeat_kv)."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head_local, self.n_kv_local, self.head_dim
        x = copy_to_tp(x, self.tp)
        q = self._xw(x, h + "attn.q.weight").view(B, T, nh, hd).transpose(1, 2)
        k = self._xw(x, h + "attn.k.weight").view(B, T, nkv, hd).transpose(1, 2)
        v = self._xw(x, h + "attn.v.weight").view(B, T, nkv, hd).transpose(1, 2)
        q, k = self._rope(q), self._rope(k)
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        y = self._attention_core(q, k, v, 0.0)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return reduce_from_tp(self._xw(y, h + "attn.o.weight"), self.tp)

    def _swiglu(self, x, h):
        x = copy_to_tp(x, self.tp)
        a = F.silu(self._xw(x, h + "mlp.gate.weight")) * self._xw(x, h + "mlp.up.weight")
        return reduce_from_tp(self._xw(a, h + "mlp.down.weight"), self.tp)

    def _mlp(self, x, h):
        x = F.gelu(self._linear(copy_to_tp(x, self.tp), h + "mlp.c_fc"), approximate="tanh")
        return self._dropout(self._row_linear(x, h + "mlp.c_proj"))

    def _dropout(self, x):
        return F.dropout(x, self.cfg.dropout, self.training) if self.cfg.dropout else x

    def run_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i: token ids -> hidden (i=0), hidden -> hidden (blocks), hidden -> logits (head).
        Under train.precision = 'bf16' / 'fp16' it computes under torch.autocast (matmuls and
        attention in bfloat16 / float16; norms and softmax in float32) and hands float32 on: the residual stream, the
        pipeline's activations and the logits stay float32, as the parameters, their gradients
        and the AdamW state do (the float32 masters)."""
        if self.precision == "fp32":
            return self._layer(i, x)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return self._layer(i, x).float()

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            T = x.shape[1]
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.cfg.block_size}")
            tok = (vocab_parallel_embedding(x, self.p("wte"), self.table, self.tp) if self.tp
                   else self.p("wte")[x])
            return tok if self.llama else self._dropout(tok + self.p("wpe")[:T])
        if i == self.cfg.n_layer + 1:  # logits (this rank's vocabulary slice under tp)
            logits = copy_to_tp(self._ln(x, "ln_f"), self.tp) @ self.p(self.head).t()
            return logits if self.vocab_mask is None else logits + self.vocab_mask
        h = f"h.{i - 1}."
        if self.llama:
            x = x + self._llama_attn(self._ln(x, h + "ln_1"), h)
            return x + self._swiglu(self._ln(x, h + "ln_2"), h)
        x = x + self._attn(self._ln(x, h + "ln_1"), h)
        return x + self._mlp(self._ln(x, h + "ln_2"), h)

    def run_layers(self, layers, x):
        full = self.checkpointing == "full"
        for i in layers:
            block = 1 <= i <= self.cfg.n_layer
            run = self.compiled_block if block and self.compiled_block is not None else self.run_layer
            x = self._recomputed(run, i, x) if full and block else run(i, x)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab) (a full model)."""
        return self.run_layers(self.layers, idx)

    def loss(self, idx, targets) -> torch.Tensor:
        return self.loss_from_logits(self(idx), targets)

    def loss_from_logits(self, logits, targets) -> torch.Tensor:
        """Mean cross-entropy; under tp from the vocabulary slices, never gathering the logits."""
        flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if self.tp:
            return vocab_parallel_cross_entropy(flat, t, self.table, self.tp)
        return F.cross_entropy(flat, t)

    def full_logits(self, logits):
        """Whole-vocabulary logits (evaluation's argmax, sampling)."""
        return gather_vocab(logits, self.tp) if self.tp else logits


def flops_per_token(model_cfg) -> float:
    """Training FLOPs per token (6N + attention), as in the PaLM appendix; for MFU figures
    (hvdllm.params.flops_per_token, both families)."""
    return params_mod.flops_per_token(model_cfg)


__all__ = ["GPT", "flops_per_token"]
