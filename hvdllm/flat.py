"""One flat float32 vector for all parameters (canonical order of hvdllm.params), so strategies
that shard or average "the model" (ZeRO-1, local SGD, parameter servers) are written once.

The vectors themselves are the backend's own (torch tensors, tf tensors; numpy on the host and in
the unit tier's simulator): the strategies touch them only through the operators + - * / that
numpy arrays, torch tensors and tf tensors share, slicing, and the few primitives of an `ops`
object (NumpyOps below is the reference; torch_backend.collectives.TorchOps and
tf_backend.collectives.TFOps are the same on their tensors). A backend's Collectives carries its
ops as `Collectives.ops`, so a strategy handed a set of collectives knows how to make and measure
the vectors it exchanges.
"""
from __future__ import annotations

import numpy as np


class NumpyOps:
    """The array primitives of the core's flat strategies, on numpy float32 vectors:

        zeros(n)              a float32 vector of n zeros (where the other vectors live)
        concat(xs)            xs joined end to end
        sqnorms(x, groups)    float64 vector: for each group of [s, e) spans, the sum over its
                              spans of dot(x[s:e], x[s:e]) (each dot accumulated in float32, as
                              np.dot does; the spans' dots added in float64)
        sqrt(x), minimum(x, c)
        scale(x, s)           x times the scalar s (a float or a 0-d float64 of these ops)
                              rounded to x's dtype first
        from_host(a) / to_host(x)
                              a host array in and out (copies): the named boundary, used at
                              construction and checkpoints only, never per step
    """

    name = "numpy"

    @staticmethod
    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    @staticmethod
    def concat(xs) -> np.ndarray:
        return np.concatenate(list(xs))

    @staticmethod
    def sqnorms(x, groups) -> np.ndarray:
        return np.array([sum(float(np.dot(x[s:e], x[s:e])) for s, e in spans) for spans in groups], np.float64)

    sqrt = staticmethod(np.sqrt)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def scale(x, s):
        return x * x.dtype.type(s)

    @staticmethod
    def from_host(a) -> np.ndarray:
        return np.array(a, np.float32)

    @staticmethod
    def to_host(x) -> np.ndarray:
        return np.array(x)


NUMPY = NumpyOps()


def ops_of(comm):
    """The ops of the vectors `comm` moves: a backend Collectives' own; a collective without them
    (HostCollectives, the unit tier's simulator, or none at all) moves numpy arrays."""
    return getattr(comm, "ops", None) or NUMPY


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

    def pad(self, flat, k: int, ops=NUMPY):
        """`flat` zero-padded to padded_total(k) (itself when nothing is missing)."""
        extra = self.padded_total(k) - int(flat.shape[0])
        return ops.concat([flat, ops.zeros(extra)]) if extra else flat

    def shard(self, flat, k: int, i: int, ops=NUMPY):
        """Shard i of the zero-padded `flat`, without padding the whole vector (only the last
        shard reaches past the end)."""
        lo, hi = self.shard_range(k, i)
        end = min(hi, max(lo, self.total))
        part = flat[lo:end]
        return ops.concat([part, ops.zeros(hi - end)]) if end < hi else part
