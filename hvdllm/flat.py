"""One flat float32 vector for all parameters (canonical order of hvdllm.params), so strategies
that shard or average "the model" (ZeRO-1, local SGD, parameter servers) are written once, in numpy.
"""
from __future__ import annotations

import numpy as np


class FlatLayout:
    def __init__(self, shapes: dict[str, tuple]):
        self.names = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def flatten(self, arrays) -> np.ndarray:
        """arrays: dict name->array or a list in canonical order."""
        seq = [arrays[n] for n in self.names] if isinstance(arrays, dict) else list(arrays)
        return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in seq])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[n])
                for i, n in enumerate(self.names)}

    def decay_mask(self) -> np.ndarray:
        """True where AdamW weight decay applies (parameters with ndim >= 2)."""
        return np.concatenate([np.full(sz, len(self.shapes[n]) >= 2) for n, sz in zip(self.names, self.sizes)])

    def padded_total(self, k: int) -> int:
        return -(-self.total // k) * k

    def shard_range(self, k: int, i: int) -> tuple[int, int]:
        """[lo, hi) of shard i of k equal shards of the zero-padded vector."""
        n = self.padded_total(k) // k
        return i * n, (i + 1) * n

    def pad(self, flat: np.ndarray, k: int) -> np.ndarray:
        extra = self.padded_total(k) - flat.size
        return np.concatenate([flat, np.zeros(extra, flat.dtype)]) if extra else flat
