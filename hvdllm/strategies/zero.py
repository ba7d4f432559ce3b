"""ZeRO stage 1: AdamW state sharded over the data-parallel group.

Messages per optimizer step, in this order, all over the dp group:
  1. reducescatter of the zero-padded flat gradient (average): rank i receives shard i;
  2. allreduce (sum) of the shard's squared gradient norm, for global clipping (under tp / pp
     then one float over the tp group and one over the pipeline: the whole model's norm);
  3. allgather of the updated parameter shards: every rank gets the whole new model (its part).
The gradient bytes moved equal one allreduce (reduce-scatter + all-gather is how a ring allreduce
works anyway); the saving is memory: each rank keeps m and v for 1/dp of the parameters only.

Every vector stays the backend's own through the step (the gradient, the parameter shard, the
moments: torch or tf tensors, on the device), moved by the backend's tensor Collectives and
handled through their `ops` (hvdllm/flat.py). What reaches the host per step is the norm, a
scalar (and under a pipeline its sum over the stages, an MPI float). Host copies are made only
at the checkpoint boundary: shard_state, load_shard, moments, gather_state.
Checkpoints stay sharded the same way: each rank writes the ranges it holds (shard_state).
"""
from __future__ import annotations

import math

import numpy as np

from .. import placement
from ..flat import FlatLayout, ops_of
from ..optim import DeviceAdamW, clip_coef


def kind_spans(pieces, kind=None) -> dict[str, list[tuple[int, int]]]:
    """[start, end) ranges of a rank's shard per kind ('sharded', 'replicated', 'skip'; all
    'sharded' without `kind`), adjacent ones merged. `pieces` yields (name, _, (start, end))."""
    spans = {"sharded": [], "replicated": [], "skip": []}
    for n, _, (s, e) in pieces:
        out = spans[kind(n) if kind else "sharded"]
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return spans


class Zero1:
    """`comm`: the Collectives of the dp group (a backend's, on its tensors; HostCollectives or
    the unit tier's simulator on numpy), whose `ops` make and measure the vectors. `flat` holds
    what this rank trains: under tensor parallelism its tp slices, in a pipeline its stage's
    parameters; each such part is sharded over its own dp group. The clipping norm stays the
    whole model's: `kind(name)` says how a parameter counts: 'sharded' (squares summed over the
    tp group's Collectives `tp`), 'replicated' (identical on every tp rank: counted once) or
    'skip' (a tied copy counted on another stage); `pp_sum(x)` then sums a float over the
    pipeline."""

    def __init__(self, flat: FlatLayout, comm, optim_cfg, agg_cfg, tp=None, kind=None, pp_sum=None):
        self.flat, self.comm, self.optim_cfg, self.agg = flat, comm, optim_cfg, agg_cfg
        self.ops = ops_of(comm)
        self.k, self.i = comm.size, comm.rank
        self.lo, self.hi = flat.shard_range(self.k, self.i)
        mask = np.concatenate([flat.decay_mask(), np.zeros(flat.padded_total(self.k) - flat.total, bool)])
        self.opt = DeviceAdamW(self.hi - self.lo, mask[self.lo:self.hi], optim_cfg, self.ops)
        self.tp, self.pp_sum = tp, pp_sum
        # [start, end) of this shard's elements per kind, adjacent ones merged: the norm is a few
        # dots over slices, no temporaries and no per-element masks
        self.spans = kind_spans(self._pieces(), kind)
        self.plain = tp is None and pp_sum is None and not self.spans["skip"]

    def step(self, flat_grad, flat_params, lr: float, scale: float | None = None) -> tuple:
        """flat_grad, flat_params: this rank's flat vectors, the backend's type (fresh ones: the
        update runs in place where the backend allows, so flat_params' range [lo, hi) may be
        overwritten). Returns (the new flat parameters, the same type; the global grad norm
        before clipping, a float). `scale` (train.precision = 'fp16'): flat_grad is the loss
        scale times the true gradient; the norm is divided by it, and where that norm is not
        finite the step is skipped: flat_params come back as they were, AdamW's step count too.
        The norm is summed over the dp group (and tp, pp) before it is read, so every rank of
        the job skips the same step."""
        ops = self.ops
        g = self.comm.reducescatter(self.flat.pad(flat_grad, self.k, ops), op="average", name="zero.grads",
                                    compression=self.agg.compression)
        if self.plain:
            total = self.comm.allreduce(ops.sqnorms(g, [[(0, self.hi - self.lo)]]), op="sum", name="zero.norm")[0]
        else:
            sq = self.comm.allreduce(ops.sqnorms(g, [self.spans["sharded"], self.spans["replicated"]]),
                                     op="sum", name="zero.norm")                  # over dp
            sharded = sq[0] if self.tp is None else self.tp.allreduce(sq[:1], op="sum", name="zero.norm.tp")[0]
            total = sharded + sq[1]
            if self.pp_sum:   # the pipeline's sum is an MPI float: the one scalar read here
                total = self.pp_sum(float(total))
        if isinstance(total, float):   # (a numpy float64 is one too)
            norm, minimum = math.sqrt(total), min
        else:                          # a 0-d tensor: the clip factor is formed on the device
            norm, minimum = ops.sqrt(total), ops.minimum
        if scale is not None:   # fp16: the true gradients' norm; an overflow anywhere: no update
            norm = norm / scale
            if not math.isfinite(float(norm)):
                return flat_params, float(norm)
        coef = clip_coef(norm, self.optim_cfg.grad_clip, minimum)
        if scale is not None:
            coef = coef / scale
        if not (isinstance(coef, float) and coef == 1.0):
            g = ops.scale(g, coef)
        shard = self.opt.step(self.flat.shard(flat_params, self.k, self.i, ops), g, lr)
        full = self.comm.allgather(shard, name="zero.params")
        return full[:self.flat.total], float(norm)

    def state_bytes(self) -> int:
        """Optimizer-state bytes held on this rank (m and v, float32)."""
        return 2 * 4 * (self.hi - self.lo)

    # checkpoints: the host boundary ----------------------------------------------------------
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
        under any layout, with or without ZeRO. The moments come to the host once each."""
        bases = bases or {}
        st = self.opt.state()
        out = dict(params, **{"optim.step": np.array(st["t"], np.int64)}) if self.i == 0 else {}
        where = {n: bases.get(n) for n in params} if self.i == 0 else {}
        for n, (a, b), (s, e) in self._pieces():
            for kind in ("m", "v"):
                out[f"optim.{kind}.{n}"] = st[kind][s:e].copy()
                where[f"optim.{kind}.{n}"] = placement.ranged(bases.get(n), a, b, self.flat.shapes[n])
        return out, where

    def load_shard(self, state, t: int) -> None:
        """The moments of this rank's range only, from a checkpoint mapping: a sharded checkpoint
        saved at the same dp size hands each piece straight from its file (Sharded.slice); any
        other is cut one parameter at a time, never the whole state at once. Assembled on the
        host, then moved to the backend once each."""
        m, v = np.zeros(self.hi - self.lo, np.float32), np.zeros(self.hi - self.lo, np.float32)
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
        """The whole state on every rank, on the host (collective)."""
        m = self.ops.to_host(self.comm.allgather(self.opt.m, name="zero.m")[:self.flat.total])
        v = self.ops.to_host(self.comm.allgather(self.opt.v, name="zero.v")[:self.flat.total])
        return {"m": m, "v": v, "t": self.opt.t}
