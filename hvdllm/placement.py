"""Where one rank's slice of a tensor-parallel array sits in the whole array (framework-free).

A placement is a small JSON-able dict  {"axis": a, "parts": p, "index": i, "groups": g}:
the whole array is cut into g equal blocks along `axis` (g = 3 for a fused [q | k | v] weight,
else 1), each block into p equal pieces, and this slice is piece i of every block, concatenated.
`None` means "the whole array" (replicated parameters, scalars, anything not split).

A placement may also carry "range": [a, b] and "of": shape: the stored array is then the raveled
elements [a, b) of the slice the other keys describe (of that shape). ZeRO-1 writes its AdamW
moments this way: each dp rank owns a contiguous range of the flat optimizer state, which cuts
across parameter boundaries, so each rank saves only the pieces it holds.

Checkpoints store every shard with its placement, so a loader can rebuild the whole array
(`assemble`) and cut the slice its own layout needs (`take`), whatever layout wrote it.
"""
from __future__ import annotations

import numpy as np


def make(axis: int, parts: int, index: int, groups: int = 1) -> dict | None:
    if parts == 1:
        return None
    return {"axis": int(axis), "parts": int(parts), "index": int(index), "groups": int(groups)}


def ranged(base: dict | None, a: int, b: int, shape) -> dict:
    """Elements [a, b) of the raveled slice at `base` (whose shape is `shape`)."""
    return {**(base or {}), "range": [int(a), int(b)], "of": [int(d) for d in shape]}


def base(pl: dict | None) -> dict | None:
    """`pl` without its range: where the whole slice sits."""
    if pl is None or "range" not in pl:
        return pl
    rest = {k: v for k, v in pl.items() if k not in ("range", "of")}
    return rest or None


def join_ranges(pieces: list[tuple[np.ndarray, dict]]) -> np.ndarray:
    """One slice from its ranged pieces, in any order. The same slice may come in more than one
    complete set of ranges (a tied weight held by two pipeline stages, each cutting it where its
    own flat shard ends): copies are identical, so any piece that starts where the joined part
    ends will do; pieces starting before that are covered already."""
    shape = pieces[0][1]["of"]
    pos, out = 0, []
    for (a, b), arr in sorted(((tuple(pl["range"]), arr) for arr, pl in pieces), key=lambda t: t[0]):
        if a > pos:
            raise ValueError(f"ranged pieces leave elements [{pos}, {a}) of {shape} uncovered")
        if a == pos and b > pos:
            out.append(np.asarray(arr).reshape(-1))
            pos = b
    if pos != int(np.prod(shape)):
        raise ValueError(f"ranged pieces end at {pos} of {int(np.prod(shape))} elements")
    return np.concatenate(out).reshape(shape)


def take(full: np.ndarray, pl: dict | None) -> np.ndarray:
    """The slice of `full` at placement `pl`."""
    if pl is not None and "range" in pl:
        a, b = pl["range"]
        return np.ascontiguousarray(take(full, base(pl))).reshape(-1)[a:b]
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
    if pl is not None and "range" in pl:
        local_shape, pl = pl["of"], base(pl)
    shape = list(local_shape)
    if pl is not None:
        shape[pl["axis"]] *= pl["parts"]
    return tuple(shape)
