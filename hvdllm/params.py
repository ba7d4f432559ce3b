"""The models' parameter layout, shared by both backends, and their seeded initial values.

One naming and one orientation for every framework: a linear layer's weight is (in, out) and is
applied as `x @ W (+ b)` (GPT-2's Conv1D layout). The initial values are drawn here with numpy from
the seed, so torch and TensorFlow start from identical weights and a checkpoint written by one
framework loads in the other.

Two families (`model.family`):

gpt2 (the default): learned position embeddings `wpe`, pre-LayerNorm blocks with biases, fused
  `attn.c_attn` = [q | k | v], tanh-GELU MLP `mlp.c_fc` / `mlp.c_proj`; names as HF GPT-2's
  (`transformer.` prefix dropped, Conv1D weights are already (in, out)).

llama: no position table (rotary embeddings on q and k), RMSNorm without bias, separate q / k / v
  projections with grouped-query attention (`model.n_kv_head` key/value heads, each shared by
  n_head / n_kv_head query heads), SwiGLU MLP, no biases anywhere. Names and the Hugging Face
  `LlamaForCausalLM` key each one maps to (C = n_embd, hd = n_embd / n_head, nh = n_head,
  nkv = n_kv_head, F = ffn_hidden, V = vocab_size):

    hvdllm                   shape         Hugging Face Llama                              shape
    wte                      (V, C)        model.embed_tokens.weight                       (V, C)
    h.{i}.ln_1.weight        (C,)          model.layers.{i}.input_layernorm.weight         (C,)
    h.{i}.attn.q.weight      (C, nh*hd)    model.layers.{i}.self_attn.q_proj.weight        (nh*hd, C)  T
    h.{i}.attn.k.weight      (C, nkv*hd)   model.layers.{i}.self_attn.k_proj.weight        (nkv*hd, C) T
    h.{i}.attn.v.weight      (C, nkv*hd)   model.layers.{i}.self_attn.v_proj.weight        (nkv*hd, C) T
    h.{i}.attn.o.weight      (nh*hd, C)    model.layers.{i}.self_attn.o_proj.weight        (C, nh*hd)  T
    h.{i}.ln_2.weight        (C,)          model.layers.{i}.post_attention_layernorm.weight (C,)
    h.{i}.mlp.gate.weight    (C, F)        model.layers.{i}.mlp.gate_proj.weight           (F, C)      T
    h.{i}.mlp.up.weight      (C, F)        model.layers.{i}.mlp.up_proj.weight             (F, C)      T
    h.{i}.mlp.down.weight    (F, C)        model.layers.{i}.mlp.down_proj.weight           (C, F)      T
    ln_f.weight              (C,)          model.norm.weight                               (C,)
    lm_head (untied only)    (V, C)        lm_head.weight                                  (V, C)

  T: transposed (HF's nn.Linear weight is (out, in)). `lm_head` is stored like an embedding, as
  HF does, (V, C), not transposed: logits = h @ lm_head.T, exactly as a tied head uses `wte`, so
  tying and untying is a rename. `hf_llama_names(model_cfg)` returns this table as a dict.
  Config keys: hidden_size = n_embd, num_hidden_layers = n_layer, num_attention_heads = n_head,
  num_key_value_heads = n_kv_head, intermediate_size = ffn_hidden, rms_norm_eps = norm_eps,
  rope_theta = rope_theta, tie_word_embeddings = tie_embeddings, vocab_size = vocab_size,
  max_position_embeddings >= block_size; HF's head_dim must be hidden_size / num_attention_heads,
  hidden_act "silu", rope_scaling none, attention_bias = mlp_bias = false. q and k keep HF's
  per-head feature order (rotate_half pairs feature j with j + hd/2), so no permutation is needed.

A classifier (task.kind = 'classify', hvdllm/task.py; its model config has `num_labels` > 0)
has the head `cls.weight` (C, num_labels) and `cls.bias` (num_labels,) in place of a language-model
output (no `lm_head`), drawn last, so the backbone's values are the language model's.

`model.tie_embeddings` (default true, both families): the head reuses `wte`. false adds
`lm_head`, drawn after every other parameter, so the tied model's values do not move.

`model.vocab_multiple` (default 1): `wte` and `lm_head` get `table_vocab` rows, vocab_size rounded
up to a multiple of it (Megatron's make-vocab-size-divisible-by, nanoGPT's 50304), so that a tp
degree that does not divide the vocabulary (GPT-2's 50257 = 29 x 1733) can still split the table.
The padded rows are never looked up and their logits are masked (`padded_vocab_mask`): the model
computes exactly what the unpadded one does, and an export to Hugging Face drops them.
"""
from __future__ import annotations

import numpy as np

FAMILIES = ("gpt2", "llama")


# ---------------------------------------------------------------------------------------------
# Derived sizes (a setting of 0 means the family's default). getattr: callers may pass any
# object with the GPT-2 fields (benchmarks build their own).

def family(model_cfg) -> str:
    return getattr(model_cfg, "family", "gpt2")


def is_llama(model_cfg) -> bool:
    return family(model_cfg) == "llama"


def kv_heads(model_cfg) -> int:
    """Key/value heads: model.n_kv_head, or n_head (plain multi-head attention) when 0."""
    return getattr(model_cfg, "n_kv_head", 0) or model_cfg.n_head


def head_dim(model_cfg) -> int:
    return model_cfg.n_embd // model_cfg.n_head


def ffn_hidden(model_cfg) -> int:
    """MLP width: model.ffn_hidden, else 4 * n_embd (gpt2) or, for llama, 8/3 * n_embd rounded up
    to a multiple of 64 (Llama's rule, which keeps SwiGLU's three matrices at about the
    parameters of GPT's two)."""
    f = getattr(model_cfg, "ffn_hidden", 0)
    if f:
        return f
    C = model_cfg.n_embd
    if not is_llama(model_cfg):
        return 4 * C
    return 64 * -(-(8 * C // 3) // 64)


def tied(model_cfg) -> bool:
    """The head reuses the token embedding `wte` (else it has its own `lm_head`)."""
    return bool(getattr(model_cfg, "tie_embeddings", True))


def head_name(model_cfg) -> str:
    return "wte" if tied(model_cfg) else "lm_head"


CLASSIFIER_HEAD = ("cls.weight", "cls.bias")


def num_labels(model_cfg) -> int:
    """A classifier's classes (hvdllm.task.ClassifierModel); 0 for a language model."""
    return getattr(model_cfg, "num_labels", 0)


VOCAB_TABLES = ("wte", "lm_head")   # the parameters with a row per vocabulary id


def table_vocab(model_cfg) -> int:
    """Rows of the embedding and head tables: vocab_size rounded up to model.vocab_multiple."""
    v, k = model_cfg.vocab_size, max(1, getattr(model_cfg, "vocab_multiple", 1))
    return -(-v // k) * k


def padded_vocab_mask(model_cfg, lo: int = 0, hi: int | None = None):
    """None when the table is not padded; else a float32 (hi - lo,) row added to the logits of
    table columns [lo, hi): 0 for real ids, a large negative number for the padding, whose
    softmax weight and gradient are then exactly 0 (finite, not -inf: a tp rank whose slice is
    all padding must not form -inf - -inf)."""
    V, table = model_cfg.vocab_size, table_vocab(model_cfg)
    if table == V:
        return None
    hi = table if hi is None else hi
    return np.where(np.arange(lo, hi) < V, 0.0, -1e30).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Shapes

def _block_shapes(model_cfg, h: str) -> dict[str, tuple]:
    C, F = model_cfg.n_embd, ffn_hidden(model_cfg)
    if is_llama(model_cfg):
        q, kv = model_cfg.n_head * head_dim(model_cfg), kv_heads(model_cfg) * head_dim(model_cfg)
        return {
            h + "ln_1.weight": (C,),
            h + "attn.q.weight": (C, q), h + "attn.k.weight": (C, kv), h + "attn.v.weight": (C, kv),
            h + "attn.o.weight": (q, C),
            h + "ln_2.weight": (C,),
            h + "mlp.gate.weight": (C, F), h + "mlp.up.weight": (C, F), h + "mlp.down.weight": (F, C),
        }
    return {
        h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
        h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
        h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
        h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
        h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,),
        h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,),
    }


def param_shapes(model_cfg) -> dict[str, tuple]:
    """Ordered {name: shape} of the whole model (family, sizes and head from the model config).
    The order is the canonical order for init, fusion and checkpoints."""
    m = model_cfg
    C = m.n_embd
    shapes = {"wte": (table_vocab(m), C)}
    if not is_llama(m):
        shapes["wpe"] = (m.block_size, C)
    for i in range(m.n_layer):
        shapes.update(_block_shapes(m, f"h.{i}."))
    shapes["ln_f.weight"] = (C,)
    if not is_llama(m):
        shapes["ln_f.bias"] = (C,)
    if not tied(m):
        shapes["lm_head"] = (table_vocab(m), C)
    k = num_labels(m)
    if k:   # a classifier: its head in place of the language-model output
        shapes.pop("lm_head", None)
        shapes["cls.weight"], shapes["cls.bias"] = (C, k), (k,)
    return shapes


def decays(shape) -> bool:
    """AdamW weight decay applies to matrices and embeddings (ndim >= 2), not biases or norm gains."""
    return len(shape) >= 2


def _residual_projection(name: str) -> bool:
    """The projections that write into the residual stream (scaled by 1/sqrt(2L) at init)."""
    return name.endswith(("c_proj.weight", "attn.o.weight", "mlp.down.weight"))


def _draws(model_cfg, seed: int):
    """(name, float64 value) of every parameter in canonical order, one at a time, from one
    generator: the one sequence both init_params and init_groups read."""
    rng = np.random.default_rng(seed)
    m = model_cfg
    for name, shape in param_shapes(m).items():
        if name.endswith(".bias"):
            value = np.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_"):
            value = np.ones(shape)
        else:
            std = 0.02 / np.sqrt(2 * m.n_layer) if _residual_projection(name) else 0.02
            value = rng.normal(0.0, std, size=shape)
        yield name, value


def _kept(name, value, cut):
    value = value.astype(np.float32)
    return value if cut is None else np.array(cut(name, value))   # a copy, not a view


def init_params(model_cfg, seed: int, names=None, cut=None) -> dict[str, np.ndarray]:
    """GPT-2 initialisation (as nanoGPT), for both families: N(0, 0.02), residual projections
    scaled by 1/sqrt(2L), norm gains 1, biases 0; drawn in canonical order from one generator.

    `names`: keep only these (a pipeline stage's); `cut(name, value)`: keep that part of each
    (a tp rank's slice). The others are still drawn, in order, so every part has the values the
    whole model would, but each array is dropped as soon as it is cut: a rank never holds more
    than its own part plus the one array being drawn."""
    keep = None if names is None else set(names)
    return {name: _kept(name, value, cut) for name, value in _draws(model_cfg, seed)
            if keep is None or name in keep}


def init_groups(model_cfg, seed: int, groups, cut=None):
    """The values init_params gives, group by group: for each list of names in `groups`
    (disjoint, in canonical order: a group's names are all drawn before the next group's
    last), the dict {name: value} yielded as soon as its last name is drawn, in one pass over
    the generator (init_params per group would draw the whole model once per group). ZeRO-3
    builds its shards from these, so a rank holds one group plus its shards, never the model."""
    groups = [list(g) for g in groups]
    wanted = {n for g in groups for n in g}
    g, held = 0, {}
    for name, value in _draws(model_cfg, seed):
        if name in wanted:
            held[name] = _kept(name, value, cut)
        del value
        while g < len(groups) and all(n in held for n in groups[g]):
            yield {n: held.pop(n) for n in groups[g]}
            g += 1
    if g < len(groups):
        raise ValueError(f"init_groups: names {sorted(set(groups[g]) - set(held))} are not parameters "
                         "of this model, or the groups are not in canonical order")


def count(model_cfg) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(model_cfg).values())


def rope_inv_freq(model_cfg) -> np.ndarray:
    """(head_dim / 2,) float32 frequencies 1 / theta^(2j / head_dim), in float32 as HF computes them."""
    hd = head_dim(model_cfg)
    theta = np.float32(getattr(model_cfg, "rope_theta", 10000.0))
    return (np.float32(1.0) / theta ** (np.arange(0, hd, 2).astype(np.float32) / np.float32(hd))).astype(np.float32)


def rope_tables(model_cfg, T: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (T, head_dim) float32, of the rotary embedding at positions 0..T-1
    (default block_size), computed as Hugging Face's LlamaRotaryEmbedding does (default rope
    type): inv_freq = 1 / theta^(2j/hd) and the angles pos * inv_freq in float32, the two halves
    of each head dimension sharing a frequency. Both backends take these same numbers."""
    T = model_cfg.block_size if T is None else T
    angles = np.arange(T, dtype=np.float32)[:, None] * rope_inv_freq(model_cfg)[None, :]
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float32)
    return np.cos(emb.astype(np.float64)).astype(np.float32), np.sin(emb.astype(np.float64)).astype(np.float32)


def flops_per_token(model_cfg) -> float:
    """Training FLOPs per token (6N + attention), as in the PaLM appendix; for MFU figures.
    gpt2: N counts every parameter (as before). llama: N is the matrices a token multiplies
    with (an untied model's `wte` is only looked up), the attention term the same 12 L C T."""
    m = model_cfg
    n = count(m)
    if is_llama(m) and not tied(m):
        n -= table_vocab(m) * m.n_embd
    return 6 * n + 12 * m.n_layer * m.n_embd * m.block_size


def hf_llama_names(model_cfg) -> dict[str, tuple[str, bool]]:
    """{hvdllm name: (Hugging Face LlamaForCausalLM key, transposed)} for a llama model (the
    table in this module's docstring). transposed: hvdllm's array is the HF tensor's .T."""
    hf = {"ln_1.weight": ("input_layernorm.weight", False),
          "attn.q.weight": ("self_attn.q_proj.weight", True),
          "attn.k.weight": ("self_attn.k_proj.weight", True),
          "attn.v.weight": ("self_attn.v_proj.weight", True),
          "attn.o.weight": ("self_attn.o_proj.weight", True),
          "ln_2.weight": ("post_attention_layernorm.weight", False),
          "mlp.gate.weight": ("mlp.gate_proj.weight", True),
          "mlp.up.weight": ("mlp.up_proj.weight", True),
          "mlp.down.weight": ("mlp.down_proj.weight", True)}
    out = {"wte": ("model.embed_tokens.weight", False)}
    for name in param_shapes(model_cfg):
        if name.startswith("h."):
            i, rest = name[2:].split(".", 1)
            key, t = hf[rest]
            out[name] = (f"model.layers.{i}.{key}", t)
    out["ln_f.weight"] = ("model.norm.weight", False)
    if not tied(model_cfg):
        out["lm_head"] = ("lm_head.weight", False)
    return out


# ---------------------------------------------------------------------------------------------
# The model as an ordered list of layers, for pipeline stages: 0 = embeddings, 1..L = blocks,
# L+1 = head (final norm and the output matrix: the tied `wte`, which then lives on both ends,
# or `lm_head`).

def n_layers(model_cfg) -> int:
    return model_cfg.n_layer + 2


def layer_params(model_cfg, i: int) -> list[str]:
    L = model_cfg.n_layer
    if i == 0:
        return ["wte"] if is_llama(model_cfg) else ["wte", "wpe"]
    if i == L + 1:
        norm = ["ln_f.weight"] if is_llama(model_cfg) else ["ln_f.weight", "ln_f.bias"]
        return norm + (list(CLASSIFIER_HEAD) if num_labels(model_cfg) else [head_name(model_cfg)])
    return list(_block_shapes(model_cfg, f"h.{i - 1}."))


def names_for_layers(model_cfg, layers) -> list[str]:
    """Parameter names used by these layers, in canonical order, each once."""
    wanted = {n for i in layers for n in layer_params(model_cfg, i)}
    return [n for n in param_shapes(model_cfg) if n in wanted]


def layer_costs(model_cfg) -> list[float]:
    """Parameter count per layer (the head counts its logits matmul, V*C, not a second wte)."""
    m = model_cfg
    shapes = param_shapes(m)
    return [float(sum(np.prod(shapes[n]) for n in layer_params(m, i))) for i in range(n_layers(m))]
