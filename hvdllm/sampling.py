"""Next-token sampling shared by both backends, so equal logits give equal samples."""
from __future__ import annotations

import numpy as np


def sample_next(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Pick one token from a (vocab,) logit vector.

    temperature <= 0 means greedy. top_k > 0 keeps the k largest logits. Probabilities are
    computed in float64 and one uniform draw is inverted through the CDF.
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    z = z / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    cdf = np.cumsum(p / p.sum())
    return int(min(np.searchsorted(cdf, rng.random(), side="right"), z.size - 1))


def generate(logits_fn, prompt: list[int], max_new_tokens: int, block_size: int, temperature: float,
             top_k: int, seed: int) -> list[int]:
    """Autoregressive loop; `logits_fn(context_ids) -> last-position logits as numpy`."""
    rng = np.random.default_rng(seed)
    ids = list(prompt) or [0]
    for _ in range(max_new_tokens):
        ids.append(sample_next(logits_fn(ids[-block_size:]), temperature, top_k, rng))
    return ids[len(prompt):] if prompt else ids[1:]
