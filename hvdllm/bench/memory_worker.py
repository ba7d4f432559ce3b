"""One job of `hvdllm bench memory` (hvdllm/bench/memory.py says what it measures): every rank
builds, for each row (zero=0, 1, 2, 3, 3 + offload), the engine parameter-parallel training
would build, over Collectives that count the bytes each collective is handed, and measures:

  - bytes of parameters and optimizer state held, from the live tensors (a freed ZeRO-3
    parameter's storage counts 0), and gradients: the bytes the step's reductions return (the
    whole gradient an allreduce returns, the shard a reduce-scatter returns);
  - the peak resident memory grown while the row's engine is built and takes its first steps
    (VmHWM reset through /proc/self/clear_refs before the build; earlier rows' engines are
    still alive, so each row's growth is its own);
  - communication per step: the bytes handed to each kind of collective in one step;
  - step times, the rows interleaved in rounds (common.interleaved), each step's slowest rank.

With --rows of one row and --budget-gib, it is the headline's probe: a watchdog thread ends the
rank (exit 7) as soon as its resident memory passes the budget, and the row fits when every rank
trained --steps steps with a finite loss and a peak below the budget.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np

from hvdllm.bench import common

MODULE = "hvdllm.bench.memory_worker"
OVER_BUDGET = 7   # a rank's exit status when the watchdog ended it


def add_model_options(p) -> None:
    """The model and rows options, the driver's and the worker's alike."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--rows", default="0,1,2,3,3o", help="ZeRO stages; '3o': stage 3 with the optimizer offloaded")


def parse(argv=None):
    p = common.worker_parser(MODULE, __doc__, default="torch", steps=3, warmup=1)
    add_model_options(p)
    p.add_argument("--budget-gib", type=float, default=0.0, help="per-rank resident memory budget (0: none)")
    return p.parse_args(argv)


status = common.proc_status   # this process's VmRSS / VmHWM in bytes


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS now
        f.write("5")


def watchdog(budget: int, period_s: float = 0.02) -> None:
    """End this rank (os._exit: no Horovod shutdown can hang it) once its resident memory passes
    `budget` bytes: the machine is shared, a probe must never take it down."""
    def watch():
        while True:
            rss = status("VmRSS")
            if rss > budget:
                print(f"[bench memory] over budget: {rss / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB", flush=True)
                os._exit(OVER_BUDGET)
            time.sleep(period_s)
    threading.Thread(target=watch, daemon=True).start()


def return_freed_memory() -> None:
    """glibc: every allocation of 64 KiB or more its own mapping, unmapped when freed
    (mallopt M_MMAP_THRESHOLD, as the environment's MALLOC_MMAP_THRESHOLD_=65536). Without it
    glibc raises its threshold after each large free and serves the next ones from its heaps,
    which keep what was freed: measured at np=2, 16 blocks of width 512, zero=3's step peak was
    1359 MiB per rank by default and 988 MiB with this (zero=3 frees a unit's weights and
    gradient every few milliseconds). Every row runs with it, zero=0 too."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)   # -3: M_MMAP_THRESHOLD
    except OSError:   # not glibc: its allocator's own policy
        pass


def nbytes(t) -> int:
    """Bytes a live array holds: a torch tensor its storage's (0 once ZeRO-3 freed it), a TF
    tensor or variable, a numpy array; None 0."""
    if t is None:
        return 0
    if hasattr(t, "untyped_storage"):
        return int(t.untyped_storage().nbytes())
    if isinstance(t, np.ndarray):
        return int(t.nbytes)
    return int(np.prod(t.shape)) * t.dtype.size


def size_of(t) -> int:
    """Bytes of an array's elements (what a collective is handed; a view counts its own)."""
    return int(np.prod(t.shape)) * (t.element_size() if hasattr(t, "element_size") else t.dtype.size)


def metered(coll_cls):
    """The backend's Collectives, counting per kind the bytes each call is handed, and of the
    gradient reductions (every call but the scalars: loss, norm, metrics) the bytes handed in
    ('grads_in') and returned ('grads_out')."""
    class Metered(coll_cls):
        def __init__(self, process_set=None):
            super().__init__(process_set)
            self.reset()

        def reset(self):
            self.sent, self.grads_in, self.grads_out = {}, 0, 0

        def _count(self, kind, tensors, out=None):
            self.sent[kind] = self.sent.get(kind, 0) + sum(size_of(t) for t in tensors)
            if out is not None:
                big = [(a, b) for a, b in zip(tensors, out) if size_of(a) > 64]
                self.grads_in += sum(size_of(a) for a, _ in big)
                self.grads_out += sum(size_of(b) for _, b in big)
            return out

        def allreduce(self, tensor, *a, **k):
            return self._count("allreduce", [tensor], [super().allreduce(tensor, *a, **k)])[0]

        def grouped_allreduce(self, tensors, *a, **k):
            return self._count("allreduce", tensors, super().grouped_allreduce(tensors, *a, **k))

        def grouped_allreduce_(self, tensors, *a, **k):   # torch's in-place DP reduction
            out = super().grouped_allreduce_(tensors, *a, **k)
            self._count("allreduce", tensors, tensors)
            return out

        def reducescatter(self, tensor, *a, **k):
            return self._count("reducescatter", [tensor], [super().reducescatter(tensor, *a, **k)])[0]

        def allgather(self, tensor, *a, **k):
            self._count("allgather", [tensor])
            return super().allgather(tensor, *a, **k)

        def broadcast(self, tensor, *a, **k):
            self._count("broadcast", [tensor])
            return super().broadcast(tensor, *a, **k)
    return Metered


def ring_bytes(sent: dict, n: int) -> float:
    """Bytes a rank sends over a ring for what it handed in: allreduce of S 2(n-1)/n S,
    reduce-scatter of S (n-1)/n S, allgather of a piece s (n-1) s."""
    return (2 * (n - 1) / n * sent.get("allreduce", 0) + (n - 1) / n * sent.get("reducescatter", 0)
            + (n - 1) * sent.get("allgather", 0))


def row_config(args, row: str, world: int, layers: int = 0):
    from hvdllm import config as config_mod
    zero, offload = int(row[0]), "optimizer" if row.endswith("o") else "none"
    sets = [f"model.n_layer={layers or args.layers}", f"model.n_embd={args.width}", f"model.n_head={args.heads}",
            f"model.block_size={args.seq}", f"model.vocab_size={args.vocab}", "model.dropout=0",
            f"train.batch_size={args.batch}", f"train.seed={args.seed}", f"train.threads={args.threads}",
            f"parallel.zero={zero}", f"parallel.offload={offload}", "optim.warmup_steps=0"]
    return config_mod.validate(config_mod.load(None, sets), world_size=world)


def held(engine) -> dict:
    """Parameter and optimizer-state bytes this rank holds now, from the live arrays."""
    z = getattr(engine, "zero", None)
    params = sum(nbytes(p) for _, p in engine.named)
    if z is not None and hasattr(z, "p_host"):   # ZeRO-2/3: the shard (and its host master copy)
        params += nbytes(z.p) + nbytes(z.p_host)
    opt = z.opt if z is not None else None
    if opt is not None:
        optimizer = nbytes(opt.m) + nbytes(opt.v)
    else:
        optimizer = engine.optimizer_state_bytes()
    return {"params": params, "optimizer": optimizer}


def run(args, rt, be) -> dict | None:
    from hvdllm.layout import Layout
    from hvdllm.memory import zero_state_bytes
    from hvdllm.params import count
    from hvdllm.strategies.zero_sharded import units_of
    n = rt.size
    return_freed_memory()
    if args.budget_gib:
        watchdog(int(args.budget_gib * 2**30))
    rng = np.random.default_rng(args.seed + rt.rank)
    x = rng.integers(0, args.vocab, (args.batch, args.seq))
    y = rng.integers(0, args.vocab, (args.batch, args.seq))
    Metered = metered(be.Collectives)
    rows, engines, losses = [], {}, []
    # a one-block engine's step first: Horovod's fusion buffer and the framework's pools,
    # allocated on first use, are no row's
    warm = row_config(args, "0", n, layers=1)
    be.Engine(warm, Layout.from_config(warm, n, rt.rank), be.Collectives()).train_step(x, y, 1e-4)
    base = status("VmRSS")
    for row in args.rows.split(","):
        cfg = row_config(args, row, n)
        layout = Layout.from_config(cfg, n, rt.rank)
        coll = Metered(rt.process_set(layout.group("dp")))
        cls = be.ShardedEngine if cfg.parallel.zero >= 2 else be.Engine
        reset_peak()
        before = status("VmRSS")
        engine = cls(cfg, layout, coll)
        z = getattr(engine, "zero", None)
        if getattr(z, "gather_async", None) is not None:   # ZeRO-3's gathers ahead bypass Collectives
            start, finish = z.gather_async
            z.gather_async = (lambda t, name, start=start, coll=coll: (coll._count("allgather", [t]),
                                                                       start(t, name))[1], finish)
        for _ in range(max(1, args.warmup)):
            losses.append(engine.train_step(x, y, 1e-4).loss)
        coll.reset()
        losses.append(engine.train_step(x, y, 1e-4).loss)
        # gradients held: zero<=1 the whole vector it reduces, zero>=2 the shards it keeps
        sent, grads = dict(coll.sent), coll.grads_in if cfg.parallel.zero <= 1 else coll.grads_out
        peak = status("VmHWM")
        psi = count(cfg.model)
        unit = max(sum(int(np.prod(engine.shape_of(m) if hasattr(engine, "shape_of") else dict(engine.named)[m].shape))
                       for m in names) for names in units_of(cfg.model)[1])
        rows.append({"row": row, "zero": cfg.parallel.zero, "offload": cfg.parallel.offload, "params_count": psi,
                     **{f"{k}_bytes": v for k, v in held(engine).items()}, "grads_bytes": grads,
                     "formula": zero_state_bytes(psi, n, cfg.parallel.zero, cfg.parallel.offload, live_unit=unit),
                     "peak_grown_bytes": peak - before, "peak_rss_bytes": peak, "sent": sent,
                     "ring_bytes": ring_bytes(sent, n)})
        engines[row] = engine
    ok = all(math.isfinite(v) for v in losses)
    ranks = common.Ranks(rt.comm)
    every = rt.comm.allgather((status("VmHWM"), ok))
    times = {}
    if args.steps and all(f for _, f in every):   # the rows' steps in rounds, ranks starting each together
        fns = {row: (lambda e=e: e.train_step(x, y, 1e-4)) for row, e in engines.items()}
        times = common.interleaved(fns, args.steps, warmup=0, per_round=1, before=ranks.idle)
    times = ranks.slowest(times)
    if rt.rank != 0:
        return None
    for r in rows:
        r["step_s"] = common.med(times.get(r["row"], []))
    return {"np": n, "backend": args.backend, "model": vars(args), "base_rss_bytes": base, "rows": rows,
            "finite": all(f for _, f in every), "rank_peaks_bytes": [p for p, _ in every],
            "run": common.run_info()}


def main(argv=None) -> int:
    args = parse(argv)
    return common.worker_main(args, lambda rt, be: run(args, rt, be), what="bench memory")


if __name__ == "__main__":
    sys.exit(main())
