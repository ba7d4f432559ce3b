"""Who is who: one frozen description of the process grid, built once and passed explicitly.

Trainer ranks form a dp x pp x tp grid. Rank order puts tp fastest, then pp, then dp (as Megatron
does), so tensor-parallel peers, which talk most, sit on neighbouring ranks (the same node).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    dp: int
    pp: int = 1
    tp: int = 1

    @classmethod
    def build(cls, parallel_cfg, world_size: int, rank: int) -> "Layout":
        pp, tp = parallel_cfg.pp, parallel_cfg.tp
        dp = parallel_cfg.dp or world_size // (pp * tp)
        if dp < 1 or dp * pp * tp != world_size:
            raise ConfigError([f"parallel.dp: dp*pp*tp = {dp}*{pp}*{tp} does not equal the "
                               f"{world_size} launched ranks"])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        return cls(world_size=world_size, rank=rank, dp=dp, pp=pp, tp=tp)

    # coordinates -------------------------------------------------------------------------
    def coords(self, rank: int | None = None) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of `rank` (default: this rank)."""
        r = self.rank if rank is None else rank
        return r // (self.pp * self.tp), (r // self.tp) % self.pp, r % self.tp

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords()[0]

    @property
    def pp_rank(self) -> int:
        return self.coords()[1]

    @property
    def tp_rank(self) -> int:
        return self.coords()[2]

    # groups ----------------------------------------------------------------------------
    def group(self, kind: str, rank: int | None = None) -> tuple[int, ...]:
        """Ranks of this rank's `kind` group ('dp', 'pp' or 'tp'), in group-rank order."""
        d, p, t = self.coords(rank)
        if kind == "dp":
            return tuple(self.rank_of(i, p, t) for i in range(self.dp))
        if kind == "pp":
            return tuple(self.rank_of(d, i, t) for i in range(self.pp))
        if kind == "tp":
            return tuple(self.rank_of(d, p, i) for i in range(self.tp))
        raise ValueError(f"unknown group kind {kind!r}")

    def all_groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every distinct group of `kind`, in order: what process sets are built from."""
        seen = []
        for r in range(self.world_size):
            g = self.group(kind, r)
            if g not in seen:
                seen.append(g)
        return seen

    def describe(self) -> str:
        return f"world={self.world_size} dp={self.dp} pp={self.pp} tp={self.tp}"
