"""One rank of `hvdllm bench pipeline`: times pipeline-parallel training steps of the real
executor (hvdllm/strategies/pipeline.py driving torch_backend/pipeline.py's PipelineEngine) for
every (schedule, m), records the per-instruction timeline of every timed step, and measures the
activation memory each stage holds. Rank 0 writes the raw results; hvdllm/bench/pipeline.py
(which launches this as `mpirun -np p python -m hvdllm.bench.pipeline_worker ...`) turns them
into efficiencies, a table, Chrome traces and plots.

What one rank does:
- builds a GPT whose layer count is a multiple of p and splits it with parallel.partition =
  'params' (embeddings + L/p blocks | ... | L/p blocks + head): stages of equal cost up to the
  small embedding lookup / logits matmul at the ends. The split and the measured per-stage
  forward/backward times are recorded, so any imbalance is visible, not hidden;
- one PipelineEngine per (schedule, m), all built up front. The micro-batch size is fixed
  (--microbatch sequences), so the batch is m x that and the work per micro-batch is the same
  for every m. Token batches are random (seeded, identical on every rank);
- warm-up steps, then --steps timed steps per variant, interleaved in rounds of --per-round
  (all variants see the same drift of a shared machine). Before every step: a barrier, then
  `engine.pipe.trace = []`, so the executor records (t_start, t_end, op, mb, chunk) for each
  instruction (that hook is always compiled in; recording costs two clock reads per instruction);
  `train_step` itself is timed around the call on each rank;
- afterwards, one untimed step per variant with a memory probe (see MemoryProbe): saved
  activation bytes per micro-batch through torch.autograd.graph.saved_tensors_hooks, and the
  bytes held by posted sends.

Clocks: time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process of a host,
so on one host the ranks' timestamps are compared as they are. Across hosts each rank's offset to
rank 0 is estimated by ping-pong (minimum round trip of 20) and subtracted.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time

import numpy as np

from hvdllm.bench import common

# name: (n_layer, n_embd, n_head, block_size, vocab_size, sequences per micro-batch)
MODELS = {
    "tiny": (2, 32, 2, 32, 256, 2),      # smoke tests only: overheads dominate
    "small": (4, 256, 4, 128, 256, 4),   # the default: ~0.1 s forward+backward per stage per micro-batch
    "medium": (8, 384, 6, 128, 256, 4),
}
LR = 1e-4


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m hvdllm.bench.pipeline_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=["torch"])
    p.add_argument("--model", default="small", choices=list(MODELS))
    p.add_argument("--n-layer", type=int, default=0,
                   help="transformer blocks (0: the model's, rounded up to a multiple of p)")
    p.add_argument("--microbatch", type=int, default=0, help="sequences per micro-batch (0: the model's)")
    p.add_argument("--m", default="1,2,4,8,16", help="comma list of micro-batch counts")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--per-round", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="", help="raw JSON written by rank 0")
    a = p.parse_args(argv)
    a.m = [int(v) for v in a.m.split(",") if v.strip()]
    a.schedules = [s.strip() for s in a.schedules.split(",") if s.strip()]
    return a


def model_config(args, p: int):
    """The hvdllm Config of the benchmark's GPT for p stages (micro-batches set per variant)."""
    from hvdllm import config as config_mod
    n_layer, n_embd, n_head, block, vocab, mb = MODELS[args.model]
    n_layer = args.n_layer or -(-n_layer // p) * p
    cfg = config_mod.Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.dropout = n_layer, n_embd, n_head, block, vocab, 0.0
    cfg.parallel.pp, cfg.parallel.partition = p, "params"
    cfg.train.seed, cfg.train.threads, cfg.train.batch_size = args.seed, args.threads, args.microbatch or mb
    cfg.train.step_timeout = 600.0
    return cfg


def variant_config(base, schedule: str, m: int, microbatch: int):
    cfg = copy.deepcopy(base)
    cfg.parallel.schedule, cfg.parallel.microbatches = schedule, m
    cfg.train.batch_size = m * microbatch
    return cfg


def make_batches(cfg, seed: int, n: int = 2):
    """n random (x, y) token batches; the same on every rank (stage 0 reads x, the last reads y)."""
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    out = []
    for _ in range(n):
        toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])))
    return out


# ---------------------------------------------------------------------------------------------
# memory

class MemoryProbe:
    """Wraps one PipelineEngine's forward/backward (the executor calls them through the engine
    instance) and follows, in instruction order, what the stage holds between micro-batches:

    - saved: bytes of the tensors autograd saves for backward during forward(mb), caught with
      torch.autograd.graph.saved_tensors_hooks, counted once per storage (a view counts its whole
      storage: that is what stays allocated), parameters excluded. The stage's output tensor,
      which the engine keeps (in `saved`) until the backward, is added when autograd did not
      save it already. Held from the end of forward(mb) to the end of backward(mb);
    - sends: every activation (non-last stage) and input gradient (non-first stage) the stage
      sends. The executor posts them with isend and keeps each request -- which holds the buffer,
      a view of the tensor's memory -- until `reduce_grads` waits for all of them at the end of
      the step, so these bytes stay allocated until then whatever the schedule.

    peak_saved is the schedule's activation memory (what GPipe vs 1F1B is about); peak_held adds
    the send buffers. Both are sampled after each forward/backward, so transient working memory
    inside one forward or backward is not included.
    """

    def __init__(self, eng):
        import torch
        self.torch, self.eng = torch, eng
        self.params = {p.untyped_storage().data_ptr() for _, p in eng.named}
        self.orig_forward, self.orig_backward = eng.forward, eng.backward
        self.reset()

    def reset(self):
        self.saved_mb: dict = {}
        self.saved = self.sends = 0
        self.peak_saved = self.peak_held = 0
        self.inflight = self.peak_inflight = 0
        self.per_mb: list[int] = []
        self.send_bytes = 0
        self.curve: list[tuple] = []  # (op, mb, saved, held) after each computation

    def _sample(self, op, mb):
        held = self.saved + self.sends
        self.peak_saved, self.peak_held = max(self.peak_saved, self.saved), max(self.peak_held, held)
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        self.curve.append((op, mb, self.saved, held))

    def forward(self, chunk, mb, inp, target):
        storages: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in self.params and ptr not in storages:
                    storages[ptr] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. a tensor without storage
                pass
            return t
        with self.torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.orig_forward(chunk, mb, inp, target)
        n = sum(storages.values())
        if isinstance(out, np.ndarray):  # not the last stage: the output is kept, and sent
            kept = getattr(self.eng, "saved", {}).get((mb, chunk))
            kept = kept[-1] if isinstance(kept, tuple) else None
            if not (isinstance(kept, self.torch.Tensor) and kept.untyped_storage().data_ptr() in storages):
                n += out.nbytes
            self.sends += out.nbytes
            self.send_bytes += out.nbytes
        self.saved_mb[(mb, chunk)] = n
        self.per_mb.append(n)
        self.saved += n
        self.inflight += 1
        self._sample("F", mb)
        return out

    def backward(self, chunk, mb, grad):
        g = self.orig_backward(chunk, mb, grad)
        self.saved -= self.saved_mb.pop((mb, chunk))
        self.inflight -= 1
        if g is not None:
            self.sends += g.nbytes
            self.send_bytes += g.nbytes
        self._sample("B", mb)
        return g

    def __enter__(self):
        self.reset()
        self.eng.forward, self.eng.backward = self.forward, self.backward
        return self

    def __exit__(self, *exc):
        del self.eng.forward, self.eng.backward  # back to the class's methods

    def result(self) -> dict:
        return {"peak_saved_bytes": self.peak_saved, "peak_held_bytes": self.peak_held,
                "peak_inflight": self.peak_inflight, "saved_bytes_per_mb": self.per_mb,
                "send_bytes": self.send_bytes, "curve": self.curve}


# ---------------------------------------------------------------------------------------------
# clocks

def clock_offsets(comm) -> tuple[list[float], bool]:
    """Each rank's perf_counter minus rank 0's, as seen by rank 0 (zeros on one host)."""
    from mpi4py import MPI
    hosts = comm.allgather(MPI.Get_processor_name())
    if len(set(hosts)) == 1:
        return [0.0] * comm.Get_size(), True
    rank, size = comm.Get_rank(), comm.Get_size()
    offsets = [0.0] * size
    for r in range(1, size):
        if rank == 0:
            best = (float("inf"), 0.0)
            for _ in range(20):
                t0 = time.perf_counter()
                comm.send(None, dest=r, tag=77)
                tr = comm.recv(source=r, tag=78)
                t1 = time.perf_counter()
                best = min(best, (t1 - t0, tr - (t0 + t1) / 2))
            offsets[r] = best[1]
        elif rank == r:
            for _ in range(20):
                comm.recv(source=0, tag=77)
                comm.send(time.perf_counter(), dest=0, tag=78)
    return comm.bcast(offsets, root=0), False


# ---------------------------------------------------------------------------------------------

def run(args, rt) -> dict | None:
    import torch

    import torch_backend
    from hvdllm import config as config_mod
    from hvdllm.layout import Layout
    from torch_backend.pipeline import PipelineEngine

    comm, p = rt.comm, rt.size
    torch_backend.configure(args.threads, args.seed)
    base = model_config(args, p)
    microbatch = base.train.batch_size
    variants = [(s, m) for m in args.m for s in args.schedules]  # neighbours in time: same m
    engines, batches, meta = {}, {}, {}
    t_setup = time.perf_counter()
    for s, m in variants:
        cfg = config_mod.validate(variant_config(base, s, m, microbatch), p)
        layout = Layout.from_config(cfg, p, rt.rank)
        eng = PipelineEngine(cfg, layout, rt)
        engines[(s, m)], batches[(s, m)] = eng, make_batches(cfg, args.seed)
        meta = {"ranges": [list(r) for r in eng.ranges], "stage_layers": comm.gather(eng.chunks, root=0),
                "stage_params": comm.gather(eng.num_params(), root=0)}
    setup_s = time.perf_counter() - t_setup
    offsets, one_host = clock_offsets(comm)
    off = offsets[rt.rank]
    records: dict = {v: [] for v in variants}
    counters = {v: 0 for v in variants}

    def step(v, keep: bool):
        eng, bs = engines[v], batches[v]
        x, y = bs[counters[v] % len(bs)]
        counters[v] += 1
        comm.Barrier()
        eng.pipe.trace = []
        t0 = time.perf_counter()
        eng.train_step(x, y, LR)
        t1 = time.perf_counter()
        tr, eng.pipe.trace = eng.pipe.trace, None
        if keep:
            records[v].append({"t0": t0 - off, "t1": t1 - off,
                               "trace": [(a - off, b - off, op, mb, c) for a, b, op, mb, c in tr]})

    tag = f"[bench pipeline] p={p}"
    if rt.rank == 0:
        print(f"{tag}: {len(variants)} variants ({', '.join(f'{s} m={m}' for s, m in variants)}); "
              f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved {args.per_round} "
              f"at a time", file=sys.stderr, flush=True)
    for v in variants:
        for _ in range(args.warmup):
            step(v, False)
    comm.Barrier()
    cpu0, t_run = common.cpu_snapshot(), time.perf_counter()
    plan = common.rounds_for(args.steps, args.per_round)
    for r, k in enumerate(plan, 1):
        gc.collect()
        for v in variants:
            for _ in range(k):
                step(v, True)
        if rt.rank == 0:
            print(f"{tag}: round {r}/{len(plan)} done ({time.perf_counter() - t_run:.1f} s)",
                  file=sys.stderr, flush=True)
    comm.Barrier()
    cpu1 = common.cpu_snapshot()
    own_cpu = sum(comm.allgather(cpu1["self_s"] - cpu0["self_s"]))

    memory = {}
    for v in variants:  # untimed: the hooks cost Python time per saved tensor
        with MemoryProbe(engines[v]) as probe:
            step(v, False)
        memory[v] = probe.result()
    stage_fb = {}
    for v in variants:  # per-stage forward/backward medians of this rank, for the simulator
        f = [b - a for rec in records[v] for a, b, op, _, _ in rec["trace"] if op == "forward"]
        bw = [b - a for rec in records[v] for a, b, op, _, _ in rec["trace"] if op == "backward"]
        stage_fb[v] = (float(np.median(f)) if f else 0.0, float(np.median(bw)) if bw else 0.0)

    gathered = comm.gather({"records": records, "memory": memory, "fb": stage_fb}, root=0)
    for eng in engines.values():
        eng.pp_comm.Free()
    if rt.rank != 0:
        return None
    out_variants = []
    for v in variants:
        s, m = v
        steps = []
        for i in range(len(gathered[0]["records"][v])):
            ranks = [g["records"][v][i] for g in gathered]
            z = ranks[0]["t0"]  # rank 0's train_step start: time zero of this step
            steps.append([{"t0": rr["t0"] - z, "t1": rr["t1"] - z,
                           "trace": [[round(a - z, 7), round(b - z, 7), op, mb, c]
                                     for a, b, op, mb, c in rr["trace"]]} for rr in ranks])
        out_variants.append({"schedule": s, "m": m, "steps": steps,
                             "memory": [g["memory"][v] for g in gathered],
                             "stage_fwd_bwd_s": [g["fb"][v] for g in gathered]})
    mc = base.model
    return {
        "benchmark": "pipeline-raw", "backend": args.backend, "p": p, "launcher": rt.launcher,
        "model": args.model, "model_config": {"n_layer": mc.n_layer, "n_embd": mc.n_embd, "n_head": mc.n_head,
                                              "block_size": mc.block_size, "vocab_size": mc.vocab_size},
        "microbatch": microbatch, "tokens_per_microbatch": microbatch * mc.block_size,
        "partition": base.parallel.partition, **meta, "threads_per_rank": args.threads,
        "torch_threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "per_round": args.per_round, "rounds": len(plan), "setup_s": setup_s,
        "timed_wall_s": time.perf_counter() - t_run, "clock_offsets_s": offsets, "one_host": one_host,
        "variants": out_variants, "host": platform.node(), "cores": os.cpu_count(),
        "foreign_cpu_cores": common.foreign_cores(cpu0, cpu1, own_cpu),
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("HOROVOD_", "OMPI_MCA_")) or k in ("OMP_NUM_THREADS",)},
    }


def main(argv=None) -> int:
    args = parse(argv)
    from hvdllm import runtime
    from hvdllm.cli import env_world_size, process_set_groups
    import torch_backend
    def start():
        base = model_config(args, env_world_size())
        groups = process_set_groups(variant_config(base, "1f1b", 1, base.train.batch_size))
        return runtime.start(torch_backend, base.aggregation, groups)

    def body(rt):
        if rt.size < 2:
            raise ValueError("the pipeline benchmark needs at least 2 ranks (mpirun -np p, p >= 2)")
        return run(args, rt)
    _, result = runtime.run_guarded(start, body)
    if result is not None and args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
