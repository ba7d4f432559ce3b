"""One rank of `hvdllm bench pipeline`: times pipeline-parallel training steps of the real
executor (hvdllm/strategies/pipeline.py driving the PipelineEngine parallelize.build_engine builds) for
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

import copy
import gc
import sys
import time

import numpy as np

from hvdllm.bench import common

# name: (n_layer, n_embd, n_head, block_size, vocab_size, sequences per micro-batch)
MODELS = {
    "tiny": (2, 32, 2, 32, 256, 2),      # smoke tests only: overheads dominate
    "small": (4, 256, 4, 128, 256, 4),   # the default: compute per micro-batch well above the message cost
    "medium": (8, 384, 6, 128, 256, 4),
}
LR = 1e-4


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.pipeline_worker", __doc__, ["torch"], "torch", steps=10, warmup=2)
    p.add_argument("--model", default="small", choices=list(MODELS))
    p.add_argument("--n-layer", type=int, default=0,
                   help="transformer blocks (0: the model's, rounded up to a multiple of p)")
    p.add_argument("--microbatch", type=int, default=0, help="sequences per micro-batch (0: the model's)")
    p.add_argument("--m", default="1,2,4,8,16", help="comma list of micro-batch counts")
    p.add_argument("--schedules", default="gpipe,1f1b")
    a = p.parse_args(argv)
    a.m = [int(v) for v in a.m.split(",") if v.strip()]
    a.schedules = [s.strip() for s in a.schedules.split(",") if s.strip()]
    return a


def model_config(args, p: int):
    """The hvdllm Config of the benchmark's GPT for p stages (micro-batches set per variant)."""
    n_layer, *rest, mb = MODELS[args.model]
    cfg = common.gpt_config((args.n_layer or -(-n_layer // p) * p, *rest, args.microbatch or mb),
                            args.seed, args.threads)
    cfg.parallel.pp, cfg.parallel.partition = p, "params"
    cfg.train.step_timeout = 600.0
    return cfg


def variant_config(base, schedule: str, m: int, microbatch: int):
    cfg = copy.deepcopy(base)
    cfg.parallel.schedule, cfg.parallel.microbatches = schedule, m
    cfg.train.batch_size = m * microbatch
    return cfg


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

def run(args, rt, backend) -> dict | None:
    import torch

    from hvdllm import config as config_mod
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine

    comm, p = rt.comm, rt.size
    base = model_config(args, p)
    microbatch = base.train.batch_size
    variants = [(s, m) for m in args.m for s in args.schedules]  # neighbours in time: same m
    engines, batches, meta = {}, {}, {}
    t_setup = time.perf_counter()
    for s, m in variants:
        cfg = config_mod.validate(variant_config(base, s, m, microbatch), p)
        layout = Layout.from_config(cfg, p, rt.rank)
        eng = build_engine(cfg, layout, rt, backend)
        # the same batches on every rank: stage 0 reads x, the last stage y
        engines[(s, m)], batches[(s, m)] = eng, common.random_batches(cfg, np.random.default_rng(args.seed), 2)
        meta = {"ranges": [list(r) for r in eng.ranges], "stage_layers": comm.gather(eng.chunks, root=0),
                "stage_params": comm.gather(eng.num_params(), root=0)}
    setup_s = time.perf_counter() - t_setup
    offsets, one_host = clock_offsets(comm)
    off = offsets[rt.rank]
    records: dict = {v: [] for v in variants}
    counters = {v: 0 for v in variants}
    timing = {"keep": False, "t0": 0.0}

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

    def timed():
        timing.update(keep=True, t0=time.perf_counter())
    tag = f"[bench pipeline] p={p}:"
    if rt.rank == 0:
        common.say(tag, f"{len(variants)} variants ({', '.join(f'{s} m={m}' for s, m in variants)}); "
                        f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved "
                        f"{args.per_round} at a time")
    # each step starts at a barrier of its own (step()); a collection between turns keeps the
    # garbage collector out of the timed steps
    _, foreign = common.Ranks(comm).measured(lambda: common.interleaved(
        {v: (lambda v=v: step(v, timing["keep"])) for v in variants}, args.steps, args.warmup,
        args.per_round, before=gc.collect, after_warmup=timed, progress=tag if rt.rank == 0 else None))
    timed_wall_s = time.perf_counter() - timing["t0"]
    timing["keep"] = False

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
        "model": args.model, "model_config": common.model_shape(mc),
        "microbatch": microbatch, "tokens_per_microbatch": microbatch * mc.block_size,
        "partition": base.parallel.partition, **meta, "threads_per_rank": args.threads,
        "torch_threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "per_round": args.per_round, "rounds": len(common.rounds_for(args.steps, args.per_round)),
        "setup_s": setup_s, "timed_wall_s": timed_wall_s, "clock_offsets_s": offsets, "one_host": one_host,
        "variants": out_variants, "foreign_cpu_cores": foreign,
        **common.run_info(),
    }


def main(argv=None) -> int:
    args = parse(argv)
    from hvdllm.cli import env_world_size, process_set_groups

    def groups():
        base = model_config(args, env_world_size())
        return process_set_groups(variant_config(base, "1f1b", 1, base.train.batch_size))
    return common.worker_main(args, lambda rt, backend: run(args, rt, backend), min_ranks=2, groups=groups,
                              agg_cfg=model_config(args, 1).aggregation, what="the pipeline benchmark")


if __name__ == "__main__":
    sys.exit(main())
