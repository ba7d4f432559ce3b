"""The GPT's parameter layout, shared by both backends, and its seeded initial values.

One naming and one orientation for every framework: a linear layer's weight is (in, out) and is
applied as `x @ W + b` (GPT-2's Conv1D layout). The initial values are drawn here with numpy from
the seed, so torch and TensorFlow start from identical weights and a checkpoint written by one
framework loads in the other.
"""
from __future__ import annotations

import numpy as np


def param_shapes(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> dict[str, tuple]:
    """Ordered {name: shape}. The order is the canonical order for init, fusion and checkpoints."""
    C = n_embd
    shapes = {"wte": (vocab_size, C), "wpe": (block_size, C)}
    for i in range(n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def decays(shape) -> bool:
    """AdamW weight decay applies to matrices and embeddings (ndim >= 2), not biases or LN gains."""
    return len(shape) >= 2


def init_params(model_cfg, seed: int) -> dict[str, np.ndarray]:
    """GPT-2 initialisation (as nanoGPT): N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    rng = np.random.default_rng(seed)
    m = model_cfg
    out = {}
    for name, shape in param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size).items():
        if name.endswith(".bias"):
            value = np.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_"):
            value = np.ones(shape)
        else:
            std = 0.02 / np.sqrt(2 * m.n_layer) if name.endswith("c_proj.weight") else 0.02
            value = rng.normal(0.0, std, size=shape)
        out[name] = value.astype(np.float32)
    return out


def count(model_cfg) -> int:
    m = model_cfg
    return sum(int(np.prod(s)) for s in param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size).values())


# ---------------------------------------------------------------------------------------------
# The GPT as an ordered list of layers, for pipeline stages: 0 = embeddings, 1..L = blocks,
# L+1 = head (final LayerNorm and the tied output embedding, so `wte` lives on both ends).

def n_layers(model_cfg) -> int:
    return model_cfg.n_layer + 2


def layer_params(model_cfg, i: int) -> list[str]:
    L = model_cfg.n_layer
    if i == 0:
        return ["wte", "wpe"]
    if i == L + 1:
        return ["ln_f.weight", "ln_f.bias", "wte"]
    block = [n[len("h.0."):] for n in param_shapes(1, 1, 1, 1) if n.startswith("h.0.")]
    return [f"h.{i - 1}.{n}" for n in block]


def names_for_layers(model_cfg, layers) -> list[str]:
    """Parameter names used by these layers, in canonical order, each once."""
    wanted = {n for i in layers for n in layer_params(model_cfg, i)}
    m = model_cfg
    return [n for n in param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size) if n in wanted]


def layer_costs(model_cfg) -> list[float]:
    """Parameter count per layer (the head counts its logits matmul, V*C, not a second wte)."""
    m = model_cfg
    shapes = param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size)
    return [float(sum(np.prod(shapes[n]) for n in layer_params(m, i))) for i in range(n_layers(m))]
