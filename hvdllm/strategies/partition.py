"""Split an ordered list of layers into contiguous pipeline parts.

Every layer is placed exactly once (checked), parts are never empty, and layer counts need not
divide evenly. Balancing minimises the largest part's cost (exact dynamic programme; n is small).
Costs: 'uniform' (1 per layer), 'params' (parameter count) or 'time' (measured, supplied).
"""
from __future__ import annotations

from ..errors import ConfigError


def balanced(costs: list[float], parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges minimising the maximum summed cost."""
    n = len(costs)
    if parts > n:
        raise ConfigError([f"parallel.pp: {parts} pipeline parts (pp x virtual stages) but the model "
                           f"has only {n} layers (embeddings + blocks + head); lower parallel.pp"])
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-cost splitting the first i layers into k parts; cut[k][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    ranges, i = [], n
    for k in range(parts, 0, -1):
        ranges.append((cut[k][i], i))
        i = cut[k][i]
    ranges.reverse()
    check(ranges, n)
    return ranges


def check(ranges: list[tuple[int, int]], n: int) -> None:
    """Every layer exactly once, in order, no empty part."""
    placed = [i for lo, hi in ranges for i in range(lo, hi)]
    if placed != list(range(n)) or any(hi <= lo for lo, hi in ranges):
        raise AssertionError(f"bad partition {ranges} of {n} layers")


def partition(costs: list[float], parts: int, method: str) -> list[tuple[int, int]]:
    if method == "uniform":
        return balanced([1.0] * len(costs), parts)
    if method in ("params", "time"):
        return balanced(list(costs), parts)
    raise ConfigError([f"parallel.partition: {method!r} is not one of 'uniform', 'params', 'time'"])
