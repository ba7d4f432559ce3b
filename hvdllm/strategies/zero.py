"""ZeRO stage 1: AdamW state sharded over the data-parallel group.

Messages per optimizer step, in this order, all over the dp group:
  1. reducescatter of the zero-padded flat gradient (average): rank i receives shard i;
  2. allreduce (sum) of the shard's squared gradient norm, for global clipping (under tp / pp
     then one float over the tp group and one over the pipeline: the whole model's norm);
  3. allgather of the updated parameter shards: every rank gets the whole new model (its part).
The gradient bytes moved equal one allreduce (reduce-scatter + all-gather is how a ring allreduce
works anyway); the saving is memory: each rank keeps m and v for 1/dp of the parameters only.
Checkpoints stay sharded the same way: each rank writes the ranges it holds (shard_state).
"""
from __future__ import annotations

import numpy as np

from .. import placement
from ..flat import FlatLayout
from ..optim import FlatAdamW, clip_coef


class Zero1:
    """`comm`: NumpyCollectives over the dp group. `flat` holds what this rank trains: under
    tensor parallelism its tp slices, in a pipeline its stage's parameters; each such part is
    sharded over its own dp group. The clipping norm stays the whole model's: `kind(name)` says
    how a parameter counts: 'sharded' (squares summed over the tp group `tp`, a
    NumpyCollectives), 'replicated' (identical on every tp rank: counted once) or 'skip' (a
    tied copy counted on another stage); `pp_sum(x)` then sums over the pipeline."""

    def __init__(self, flat: FlatLayout, comm, optim_cfg, agg_cfg, tp=None, kind=None, pp_sum=None):
        self.flat, self.comm, self.optim_cfg, self.agg = flat, comm, optim_cfg, agg_cfg
        self.k, self.i = comm.size, comm.rank
        self.lo, self.hi = flat.shard_range(self.k, self.i)
        mask = flat.pad(flat.decay_mask(), self.k)[self.lo:self.hi]
        self.opt = FlatAdamW(self.hi - self.lo, mask, optim_cfg)
        self.tp, self.pp_sum = tp, pp_sum
        # [start, end) of this shard's elements per kind, for the norm without temporaries
        self.spans = {"sharded": [], "replicated": [], "skip": []}
        for n, _, (s, e) in self._pieces():
            self.spans[kind(n) if kind else "sharded"].append((s, e))
        self.plain = tp is None and pp_sum is None and not self.spans["skip"]

    def step(self, flat_grad: np.ndarray, flat_params: np.ndarray, lr: float) -> tuple[np.ndarray, float]:
        """Returns (new flat parameters, global grad norm before clipping)."""
        g = self.comm.reducescatter(self.flat.pad(flat_grad, self.k), op="average", name="zero.grads",
                                    compression=self.agg.compression)
        if self.plain:
            sq = self.comm.allreduce(np.array([np.dot(g, g)], np.float64), op="sum", name="zero.norm")
            norm = float(np.sqrt(sq[0]))
        else:
            part = np.array([sum(float(np.dot(g[s:e], g[s:e])) for s, e in self.spans[kind])
                             for kind in ("sharded", "replicated")], np.float64)
            sq = self.comm.allreduce(part, op="sum", name="zero.norm")            # over dp
            sharded = sq[0] if self.tp is None else \
                self.tp.allreduce(sq[:1].copy(), op="sum", name="zero.norm.tp")[0]
            total = sharded + sq[1]
            norm = float(np.sqrt(self.pp_sum(total) if self.pp_sum else total))
        g = g * np.float32(clip_coef(norm, self.optim_cfg.grad_clip))
        shard = self.flat.pad(flat_params, self.k)[self.lo:self.hi].copy()
        self.opt.step(shard, g, lr)
        full = self.comm.allgather(shard, name="zero.params")
        return full[:self.flat.total], norm

    def state_bytes(self) -> int:
        """Optimizer-state bytes held on this rank (m and v)."""
        return self.opt.m.nbytes + self.opt.v.nbytes

    # checkpoints -----------------------------------------------------------------------------
    def _pieces(self):
        """(name, [a, b) within the parameter, [a, b) within this rank's shard) for every
        parameter this rank's flat range [lo, hi) touches."""
        for k, n in enumerate(self.flat.names):
            o, end = int(self.flat.offsets[k]), int(self.flat.offsets[k + 1])
            a, b = max(self.lo, o), min(self.hi, end)
            if a < b:
                yield n, (a - o, b - o), (a - self.lo, b - self.lo)

    def shard_state(self, params: dict[str, np.ndarray], bases: dict | None = None) -> tuple[dict, dict]:
        """This rank's part of a sharded checkpoint, with no communication: dp rank 0 adds the
        parameters and optim.step; every rank adds the moments it holds, as ranged pieces of
        each parameter its flat range [lo, hi) touches (placement.ranged), of the tp slice at
        bases[name] (None: the whole array). A loader joins the pieces, so the checkpoint loads
        under any layout, with or without ZeRO."""
        bases = bases or {}
        out = dict(params, **{"optim.step": np.array(self.opt.t, np.int64)}) if self.i == 0 else {}
        where = {n: bases.get(n) for n in params} if self.i == 0 else {}
        for n, (a, b), (s, e) in self._pieces():
            for kind, vec in (("m", self.opt.m), ("v", self.opt.v)):
                out[f"optim.{kind}.{n}"] = vec[s:e].copy()
                where[f"optim.{kind}.{n}"] = placement.ranged(bases.get(n), a, b, self.flat.shapes[n])
        return out, where

    def load_shard(self, state, t: int) -> None:
        """The moments of this rank's range only, from a checkpoint mapping: a sharded checkpoint
        saved at the same dp size hands each piece straight from its file (Sharded.slice); any
        other is cut one parameter at a time, never the whole state at once."""
        m, v = np.zeros_like(self.opt.m), np.zeros_like(self.opt.v)
        for n, (a, b), (s, e) in self._pieces():
            pl = placement.ranged(None, a, b, self.flat.shapes[n])
            for kind, buf in (("m", m), ("v", v)):
                key = f"optim.{kind}.{n}"
                buf[s:e] = state.slice(key, pl) if hasattr(state, "slice") else \
                    placement.take(np.asarray(state[key], np.float32), pl)
        self.opt.load(m, v, t)

    def moments(self) -> dict[str, np.ndarray]:
        """The whole moments as named arrays ('optim.m.<name>', 'optim.v.<name>', 'optim.step'),
        gathered over the dp group (collective): for state_dict, which is unsharded."""
        st = self.gather_state()
        m, v = self.flat.unflatten(st["m"]), self.flat.unflatten(st["v"])
        out = {f"optim.m.{n}": a.copy() for n, a in m.items()}
        out.update({f"optim.v.{n}": a.copy() for n, a in v.items()})
        out["optim.step"] = np.array(st["t"], np.int64)
        return out

    def gather_state(self) -> dict[str, np.ndarray]:
        """The whole state on every rank (collective)."""
        m = self.comm.allgather(self.opt.m, name="zero.m")[:self.flat.total]
        v = self.comm.allgather(self.opt.v, name="zero.v")[:self.flat.total]
        return {"m": m, "v": v, "t": self.opt.t}
