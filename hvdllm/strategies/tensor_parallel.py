"""Tensor parallelism (Megatron-LM style): which parameters split along which axis, and the
collectives each layer issues. Framework-free: the backends implement the layers (torch autograd
functions, TensorFlow custom gradients) and call `shard`/`unshard` from here.

Per transformer block, inside the tp group only:
  attention: f (identity forward, allreduce backward) -> column-parallel c_attn (this rank's heads)
             -> attention on local heads -> row-parallel c_proj -> g (allreduce forward)
  MLP:       f -> column-parallel c_fc -> GELU -> row-parallel c_proj -> g
so two allreduces in the forward pass and two in the backward pass per block.
The llama family (hvdllm/params.py) is split the same way: column-parallel attn.q / attn.k /
attn.v and mlp.gate / mlp.up, row-parallel attn.o and mlp.down, RMSNorm gains replicated.
Key/value heads (grouped-query attention) are split across the tp ranks, never replicated:
tp must divide model.n_kv_head (and model.n_head); rank r holds query heads
[r*nh/tp, (r+1)*nh/tp) and exactly the key/value heads they read, [r*nkv/tp, (r+1)*nkv/tp),
so attention needs no communication. A model with fewer key/value heads than tp ranks (e.g.
multi-query attention at tp=2) is refused by config validation, naming model.n_kv_head.
Outside the blocks: the vocabulary-parallel embedding (each rank holds vocab rows [lo, hi),
looks up the ids it owns, zeros elsewhere, then one forward allreduce) and the vocabulary-parallel
cross-entropy, which never gathers the full logits: allreduce(max), allreduce(sum exp) and
allreduce(target logit) of (batch, time)-sized tensors only.
"""
from __future__ import annotations

import re

import numpy as np

from .. import placement as placement_mod

# style per parameter name pattern: column (split output features), row (split input features),
# vocab (split vocabulary rows), replicate (every rank holds it whole).
STYLES = [
    (r"h\.\d+\.attn\.c_attn\.(weight|bias)$", "qkv_column"),
    (r"h\.\d+\.mlp\.c_fc\.(weight|bias)$", "column"),
    (r"h\.\d+\.(attn|mlp)\.c_proj\.weight$", "row"),
    (r"h\.\d+\.(attn\.(q|k|v)|mlp\.(gate|up))\.weight$", "column"),   # llama
    (r"h\.\d+\.(attn\.o|mlp\.down)\.weight$", "row"),                  # llama
    (r"^(wte|lm_head)$", "vocab"),
    (r".*", "replicate"),
]


def style(name: str) -> str:
    """The split of a parameter, or of its AdamW moments ('optim.m.<name>', 'optim.v.<name>')."""
    if name.startswith(("optim.m.", "optim.v.")):
        name = name[len("optim.m."):]
    for pattern, s in STYLES:
        if re.search(pattern, name):
            return s
    raise AssertionError(name)


def norm_kind(name: str) -> str:
    """How a parameter's gradient counts in the global norm under tp (strategies/zero.py):
    slices are summed over the group, replicated parameters counted once."""
    return "replicated" if style(name) == "replicate" else "sharded"


def _axis(name: str, ndim: int) -> int:
    s = style(name)
    if s in ("column", "qkv_column"):
        return ndim - 1          # weights (in, out): out is the last axis; biases have one axis
    return 0                     # row: (in, out) splits `in`; vocab: (V, C) splits V


def placement(name: str, ndim: int, tp: int, rank: int) -> dict | None:
    """Where tp rank `rank`'s slice of parameter `name` sits in the whole array (placement.py);
    None for replicated parameters. Checkpoints store it beside every shard."""
    s = style(name)
    if s == "replicate" or tp == 1 or ndim == 0:
        return None
    return placement_mod.make(_axis(name, ndim), tp, rank, 3 if s == "qkv_column" else 1)


def placements(local: dict, tp: int, rank: int) -> dict:
    """{name: placement} for a rank's local state (parameters and AdamW moments)."""
    return {n: placement(n, np.ndim(a), tp, rank) for n, a in local.items()}


def shard(name: str, full: np.ndarray, tp: int, rank: int) -> np.ndarray:
    """This tp rank's slice of a full parameter (the whole array for replicated ones).
    A fused [q | k | v] weight is split by heads within each of q, k and v."""
    return placement_mod.take(full, placement(name, np.ndim(full), tp, rank))


def unshard(name: str, shards: list[np.ndarray]) -> np.ndarray:
    """Inverse of shard over all tp ranks' slices (in tp-rank order)."""
    tp = len(shards)
    return placement_mod.assemble([(a, placement(name, a.ndim, tp, r)) for r, a in enumerate(shards)])


def shard_state(state, tp: int, rank: int, keys=None) -> dict:
    """A whole checkpoint's arrays (or those named by `keys`) -> this tp rank's slices
    (parameters and AdamW moments). A sharded checkpoint (checkpoint.Sharded) reads only the
    shard files that overlap the slice."""
    keys = [k for k in (state.keys() if keys is None else keys) if k in state]
    if hasattr(state, "slice"):
        return {k: state.slice(k, placement(k, len(state.shapes[k]), tp, rank)) for k in keys}
    return {k: shard(k, state[k], tp, rank) for k in keys}


def local_shapes(shapes: dict[str, tuple], tp: int) -> dict[str, tuple]:
    """Shapes of one tp rank's slices."""
    out = {}
    for name, shape in shapes.items():
        shape = list(shape)
        if style(name) != "replicate" and tp > 1:
            shape[_axis(name, len(shape))] //= tp
        out[name] = tuple(shape)
    return out


def problems(model_cfg, tp: int) -> list[str]:
    """What must divide for a tp-way split (used by config validation)."""
    from ..params import ffn_hidden, is_llama, kv_heads, table_vocab
    p = []
    if tp > 1:
        if model_cfg.n_head % tp:
            p.append(f"parallel.tp: {tp} does not divide model.n_head={model_cfg.n_head}")
        if is_llama(model_cfg) and kv_heads(model_cfg) % tp:
            p.append(f"model.n_kv_head: parallel.tp={tp} does not divide the {kv_heads(model_cfg)} key/value "
                     f"heads; key/value heads are split across tp ranks, never replicated (choose "
                     f"parallel.tp dividing model.n_kv_head)")
        if ffn_hidden(model_cfg) % tp:
            p.append(f"parallel.tp: {tp} does not divide the MLP width (model.ffn_hidden = "
                     f"{ffn_hidden(model_cfg)})")
        if model_cfg.vocab_size and table_vocab(model_cfg) % tp:
            k = getattr(model_cfg, "vocab_multiple", 1)
            p.append(f"parallel.tp: {tp} does not divide the vocabulary table ({table_vocab(model_cfg)} rows: "
                     f"model.vocab_size={model_cfg.vocab_size}" + (f" padded to model.vocab_multiple={k}" if k > 1
                                                                   else "")
                     + f"); set model.vocab_multiple to a multiple of {tp} (e.g. {64 * tp}) to pad it")
    return p
