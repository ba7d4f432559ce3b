"""Where one rank's slice of a tensor-parallel array sits in the whole array (framework-free).

A placement is a small JSON-able dict  {"axis": a, "parts": p, "index": i, "groups": g}:
the whole array is cut into g equal blocks along `axis` (g = 3 for a fused [q | k | v] weight,
else 1), each block into p equal pieces, and this slice is piece i of every block, concatenated.
`None` means "the whole array" (replicated parameters, scalars, anything not split).

Checkpoints store every shard with its placement, so a loader can rebuild the whole array
(`assemble`) and cut the slice its own layout needs (`take`), whatever layout wrote it.
"""
from __future__ import annotations

import numpy as np


def make(axis: int, parts: int, index: int, groups: int = 1) -> dict | None:
    if parts == 1:
        return None
    return {"axis": int(axis), "parts": int(parts), "index": int(index), "groups": int(groups)}


def take(full: np.ndarray, pl: dict | None) -> np.ndarray:
    """The slice of `full` at placement `pl`."""
    if pl is None:
        return full
    ax = pl["axis"]
    blocks = np.split(full, pl["groups"], axis=ax)
    pieces = [np.array_split(b, pl["parts"], axis=ax)[pl["index"]] for b in blocks]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=ax)


def assemble(slices: list[tuple[np.ndarray, dict | None]]) -> np.ndarray:
    """The whole array from (slice, placement) pairs covering every index once (any order)."""
    whole = [a for a, pl in slices if pl is None]
    if whole:
        return whole[0]
    first = slices[0][1]
    ax, parts, groups = first["axis"], first["parts"], first["groups"]
    by_index = {pl["index"]: a for a, pl in slices}
    if sorted(by_index) != list(range(parts)):
        raise ValueError(f"slices {sorted(by_index)} do not cover parts 0..{parts - 1}")
    per_index = [np.split(by_index[i], groups, axis=ax) for i in range(parts)]
    return np.concatenate([np.concatenate([per_index[i][g] for i in range(parts)], axis=ax)
                           for g in range(groups)], axis=ax)


def global_shape(local_shape, pl: dict | None) -> tuple:
    shape = list(local_shape)
    if pl is not None:
        shape[pl["axis"]] *= pl["parts"]
    return tuple(shape)
