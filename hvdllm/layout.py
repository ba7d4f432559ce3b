"""Who is who: one frozen description of the process grid, built once and passed explicitly.

Trainer ranks form a dp x pp x tp grid. Rank order puts tp fastest, then pp, then dp (as Megatron
does), so tensor-parallel peers, which talk most, sit on neighbouring ranks (the same node).
Role ranks follow the trainers, in this order: parameter servers, evaluators, generators.
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
    servers: int = 0
    evaluators: int = 0
    generators: int = 0

    @classmethod
    def build(cls, parallel_cfg, world_size: int, rank: int, servers: int = 0, evaluators: int = 0,
              generators: int = 0) -> "Layout":
        pp, tp = parallel_cfg.pp, parallel_cfg.tp
        trainers = world_size - servers - evaluators - generators
        dp = parallel_cfg.dp or trainers // (pp * tp)
        if dp < 1 or dp * pp * tp != trainers:
            raise ConfigError([f"parallel.dp: dp*pp*tp = {dp}*{pp}*{tp} does not equal the "
                               f"{trainers} trainer ranks of the {world_size} launched"])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        return cls(world_size, rank, dp, pp, tp, servers, evaluators, generators)

    @classmethod
    def from_config(cls, cfg, world_size: int, rank: int) -> "Layout":
        return cls.build(cfg.parallel, world_size, rank, cfg.ps.servers, cfg.roles.evaluators,
                         cfg.roles.generators)

    # roles -------------------------------------------------------------------------------
    @property
    def n_trainers(self) -> int:
        return self.dp * self.pp * self.tp

    def role_ranks(self, role: str) -> tuple[int, ...]:
        start = {"trainer": 0, "server": self.n_trainers, "evaluator": self.n_trainers + self.servers,
                 "generator": self.n_trainers + self.servers + self.evaluators}[role]
        count = {"trainer": self.n_trainers, "server": self.servers, "evaluator": self.evaluators,
                 "generator": self.generators}[role]
        return tuple(range(start, start + count))

    def role(self, rank: int | None = None) -> str:
        r = self.rank if rank is None else rank
        for role in ("trainer", "server", "evaluator", "generator"):
            if r in self.role_ranks(role):
                return role
        raise ValueError(f"rank {r} outside world of {self.world_size}")

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
        """Every distinct group of `kind` among the trainers, in order: what process sets are
        built from."""
        seen = []
        for r in range(self.n_trainers):
            g = self.group(kind, r)
            if g not in seen:
                seen.append(g)
        return seen

    def describe(self) -> str:
        extra = "".join(f" {k}={getattr(self, k)}" for k in ("servers", "evaluators", "generators")
                        if getattr(self, k))
        return f"world={self.world_size} dp={self.dp} pp={self.pp} tp={self.tp}{extra}"
