"""Worker of `hvdllm bench aggregation`, started by hvdllm/bench/aggregation.py under mpirun.

    mpirun -np 2 ... python -m hvdllm.bench.aggregation_worker --backend torch \
        --sections bandwidth,compression,zero,profile --sizes 1024,4096,... --out part.json

Sections (each measures only inside this one process group, interleaved so drift hits alike):

bandwidth    For each message size S (bytes of float32), on one numpy buffer `a` per rank (random,
             different per rank) and with the variants run in rounds A B C D A B C D ..., a
             barrier before each call, one call per round:
               hvdllm      the backend's Collectives.allreduce(op='sum') on a framework tensor made
                           from `a` once (zero-copy for torch; one tf.constant for TF): the path the
                           Engine's gradients take
               hvdllm_np   NumpyCollectives.allreduce(a, op='sum'): numpy in, numpy out, conversions
                           included: what crossing the host boundary costs
               mpi4py      comm.Allreduce(a, r, op=MPI.SUM), into a receive buffer `r` kept across
                           calls (the baseline)
               p2p         comm.Sendrecv(a -> rank+1, r <- rank-1): every rank sends S bytes to its
                           ring neighbour while receiving S bytes (at np=2 a pairwise exchange): the
                           per-link bandwidth a ring allreduce can reach on this host
             A call's time is the slowest rank's (all leave the barrier together); the figure is
             the median over the reps. Once per size the hvdllm and mpi4py sums are compared.
compression  Collectives.allreduce(op='sum') with compression none / fp16 / bf16 at a few sizes,
             interleaved the same way, plus the largest relative error of each against the exact sum.
zero         two Engines on the same model, batches and AdamW: parallel.zero=0 and =1, stepped
             alternately (one step each per round, a barrier before each); step time is the
             slowest rank's; optimizer_state_bytes() of every rank; weights compared at the end.
profile      where the time of a large Horovod allreduce goes (sizes >= --profile-min): the
             hvdllm call against mpi4py into a kept buffer and mpi4py into a freshly allocated
             buffer each call (what Horovod does: every allreduce allocates a new output tensor,
             whose pages are faulted in and zeroed by the kernel as MPI writes them), the cost of
             first-touching a fresh buffer alone, and Horovod's own timeline of the hvdllm calls
             (negotiation vs MPI_ALLREDUCE vs the rest).

Rank 0 writes one JSON (--out) with every per-call time.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

from hvdllm.bench import common
from hvdllm.bench.common import MB, med

SECTIONS = ("bandwidth", "compression", "zero", "profile")
ZERO_MODELS = common.GPT_MODELS
LR = 1e-3
GROUP_PIECES = 16  # profile: the same bytes as one grouped allreduce of this many tensors


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.aggregation_worker", __doc__)
    p.add_argument("--sections", default="bandwidth,compression,zero",
                   help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--sizes", default="1024,1048576", help="bandwidth: message sizes in bytes, comma list")
    p.add_argument("--reps", type=int, default=10,
                   help="timed calls per variant at sizes >= 16 MiB; 2x below, 5x below 1 MiB")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant and size first")
    p.add_argument("--compress-sizes", default="4194304", help="compression: sizes in bytes")
    p.add_argument("--zero-model", default="small", choices=list(ZERO_MODELS))
    p.add_argument("--zero-steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--zero-warmup", type=int, default=2)
    p.add_argument("--profile-min", type=int, default=16 * MB, help="profile sizes >= this many bytes")
    p.add_argument("--fusion-threshold-mb", type=float, default=0.0,
                   help="aggregation.fusion_threshold_mb for this job (0: Horovod's default)")
    p.add_argument("--cycle-time-ms", type=float, default=0.0,
                   help="aggregation.cycle_time_ms for this job (0: Horovod's default)")
    a = p.parse_args(argv)
    a.sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: {bad} not among {', '.join(SECTIONS)}")
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    a.compress_sizes = [int(s) for s in a.compress_sizes.split(",") if s]
    return a


def reps_for(size: int, reps: int) -> int:
    """Fewer calls for large messages (their time is long and steady), more for small ones."""
    if size >= 16 * MB:
        return reps
    return 2 * reps if size >= MB else 5 * reps


def human(n: float) -> str:
    for unit, k in (("GB", 1 << 30), ("MB", MB), ("KB", 1024)):
        if n >= k:
            v = n / k
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{int(n)}B"


# ---------------------------------------------------------------------------------------------
# framework adapters: a tensor from a numpy buffer, and the result back as numpy

class Framework:
    def __init__(self, backend_name: str, backend, rt):
        self.name, self.backend, self.rt = backend_name, backend, rt
        self.coll = backend.Collectives()
        self.ncoll = backend.NumpyCollectives(self.coll)
        if backend_name == "torch":
            import torch
            self.tensor = torch.from_numpy  # shares memory: no copy
            self.numpy = lambda t: t.numpy()
            self.split = lambda t, k: list(t.chunk(k))
            import horovod.torch as hvd
            self.hvd = hvd
            # Horovod's in-place allreduce: no output tensor is allocated
            self.inplace = lambda t, name: hvd.allreduce_(t, op=hvd.Sum, name=name)
        else:
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")  # Collectives traces one tf.function per call site
            self.tensor = tf.constant       # one copy, made outside the timed calls
            self.numpy = lambda t: t.numpy()
            import horovod.tensorflow as hvd
            self.hvd = hvd
            self.split = lambda t, k: tf.split(t, k)
            self.inplace = None  # horovod.tensorflow has no in-place allreduce


class Group(common.Ranks):
    def __init__(self, comm):
        from mpi4py import MPI
        super().__init__(comm)
        self.MPI = MPI

    def timed(self, fns, reps: int, warmup: int) -> dict | None:
        """One call of each variant per round, a barrier before each: the slowest rank's times."""
        return self.slowest(common.interleaved(fns, reps, warmup, 1, before=self.barrier))


def _said(tag: str, section: str, size: int, slow: dict, digits: int, extra: str = "") -> dict:
    common.say(tag, f"{section} {human(size):>6}: " + ", ".join(
        f"{k} {med(v) * 1e3:.{digits}f} ms" for k, v in slow.items()) + extra)
    return slow


def _buffers(args, fw: Framework, g: Group, size: int):
    """`size` bytes of random float32 (different per rank), a receive buffer and the framework
    tensor of the first."""
    a = np.random.default_rng([args.seed, g.rank, size]).random(size // 4, dtype=np.float32) - np.float32(0.5)
    r = np.empty_like(a)
    r.fill(0)  # fault the receive buffer in once: mpi4py's is reused, as a training loop would
    return a, r, fw.tensor(a)


# ---------------------------------------------------------------------------------------------
# bandwidth

def bandwidth(args, fw: Framework, g: Group, tag: str) -> list[dict]:
    MPI, comm = g.MPI, g.comm
    right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    rows = []
    for size in args.sizes:
        n, (a, r, t) = size // 4, _buffers(args, fw, g, size)
        name = f"bw.{size}"
        fns = {
            "hvdllm": lambda: fw.coll.allreduce(t, op="sum", name=name),
            "hvdllm_np": lambda: fw.ncoll.allreduce(a, op="sum", name=name + ".np"),
            "mpi4py": lambda: comm.Allreduce(a, r, op=MPI.SUM),
            "p2p": lambda: comm.Sendrecv(a, dest=right, sendtag=7, recvbuf=r, source=left, recvtag=7),
        }
        # the same operation: hvdllm's sum equals mpi4py's on these buffers
        ref_h = fw.numpy(fw.coll.allreduce(t, op="sum", name=name))
        comm.Allreduce(a, r, op=MPI.SUM)
        diff = float(np.max(np.abs(ref_h - r))) if n else 0.0
        del ref_h
        reps = reps_for(size, args.reps)
        t0 = time.perf_counter()
        slow = g.timed(fns, reps, args.warmup)
        diffs = g.gather(diff)
        fns = t = a = r = None   # free the buffers before the next size
        gc.collect()
        if g.rank == 0:
            rows.append({"bytes": size, "size": human(size), "reps": reps, "max_abs_diff_vs_mpi4py": max(diffs),
                         "times_s": _said(tag, "bandwidth", size, slow, 3, f" ({reps} reps)"),
                         "wall_s": time.perf_counter() - t0})
    return rows


# ---------------------------------------------------------------------------------------------
# compression

def compression(args, fw: Framework, g: Group, tag: str) -> list[dict]:
    MPI, comm = g.MPI, g.comm
    rows = []
    for size in args.compress_sizes:
        n = size // 4
        rng = np.random.default_rng([args.seed, g.rank, size, 2])
        a = rng.standard_normal(n, dtype=np.float32)
        exact = np.empty_like(a)
        comm.Allreduce(a, exact, op=MPI.SUM)
        t = fw.tensor(a)
        fns = {c: (lambda c=c: fw.coll.allreduce(t, op="sum", name=f"cmp.{c}.{size}", compression=c))
               for c in ("none", "fp16", "bf16")}
        errs = {}
        scale = float(np.max(np.abs(exact))) or 1.0
        for c, fn in fns.items():
            errs[c] = float(np.max(np.abs(fw.numpy(fn()) - exact))) / scale
        del exact
        reps = reps_for(size, args.reps)
        slow = g.timed(fns, reps, args.warmup)
        fns = t = a = None   # free the buffers before the next size
        gc.collect()
        if g.rank == 0:
            rows.append({"bytes": size, "size": human(size), "reps": reps,
                         "times_s": _said(tag, "compression", size, slow, 2), "max_err_rel_to_max": errs})
    return rows


# ---------------------------------------------------------------------------------------------
# ZeRO-1 vs plain data parallelism

def zero_config(model: str, zero: int, seed: int):
    cfg = common.gpt_config(ZERO_MODELS[model], seed)
    cfg.parallel.zero = zero
    return cfg


def zero(args, fw: Framework, g: Group, tag: str) -> dict | None:
    from hvdllm import config as config_mod
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    from hvdllm.params import count
    cfgs = {name: config_mod.validate(zero_config(args.zero_model, z, args.seed), g.size)
            for name, z in (("dp", 0), ("zero1", 1))}
    engines = {name: build_engine(cfg, Layout.from_config(cfg, g.size, g.rank), fw.rt, fw.backend)
               for name, cfg in cfgs.items()}
    cfg = cfgs["dp"]
    batches = common.random_batches(cfg, np.random.default_rng([args.seed, g.rank, 3]))
    fns = {}
    for name, eng in engines.items():
        nxt = common.cycle(batches)
        fns[name] = lambda eng=eng, nxt=nxt: eng.train_step(*nxt(), LR)
    if g.rank == 0:
        common.say(tag, f"zero: model {args.zero_model} {count(cfg.model):,} params, {args.zero_warmup} "
                        f"warm-up + {args.zero_steps} timed steps per variant, interleaved")
    times, foreign = g.measured(lambda: common.interleaved(fns, args.zero_steps, args.zero_warmup, 1,
                                                           before=g.barrier))
    slow = g.slowest(times)
    state_bytes = g.gather({k: int(e.optimizer_state_bytes()) for k, e in engines.items()})
    w = {k: e.flat_params() for k, e in engines.items()}
    wdiff = float(np.max(np.abs(w["dp"] - w["zero1"])))
    if g.rank != 0:
        return None
    P = count(cfg.model)
    return {"np": g.size, "model": args.zero_model, "model_config": common.model_shape(cfg.model),
            "params": P, "param_bytes": 4 * P, "batch_per_rank": cfg.train.batch_size,
            "steps": args.zero_steps, "warmup": args.zero_warmup, "times_s": slow,
            "optimizer_state_bytes": {k: [sb[k] for sb in state_bytes] for k in engines},
            "weights_max_abs_diff": wdiff, "foreign_cpu_cores": foreign}


# ---------------------------------------------------------------------------------------------
# profile of the large-message Horovod path

def timeline_phases(path: str) -> dict[str, dict[str, list[float]]]:
    """{tensor name: {activity: [durations in s]}} from a Horovod timeline (Chrome trace JSON,
    written by rank 0; 'B'/'E' pairs per tensor row, a nested activity inside its op)."""
    try:
        text = open(path).read().rstrip().rstrip(",")
        events = json.loads(text if text.endswith("]") else text + "]")
    except (OSError, ValueError):
        return {}
    names = {}  # pid -> tensor name
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e.get("args", {}).get("name", str(e["pid"]))
    stacks: dict[int, list] = {}
    out: dict[str, dict[str, list[float]]] = {}
    for e in events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "B":
            stacks.setdefault(pid, []).append((e.get("name", "?"), e["ts"]))
        elif ph == "E" and stacks.get(pid):
            act, ts = stacks[pid].pop()
            out.setdefault(names.get(pid, str(pid)), {}).setdefault(act, []).append((e["ts"] - ts) * 1e-6)
    return out


def profile(args, fw: Framework, g: Group, tag: str) -> list[dict]:
    MPI, comm = g.MPI, g.comm
    sizes = [s for s in args.sizes if s >= args.profile_min]
    tl_dir = tempfile.mkdtemp(prefix="hvdllm-tl-") if g.rank == 0 else None
    tl_dir = comm.bcast(tl_dir, root=0)
    rows = []
    for size in sizes:
        n, (a, r, t) = size // 4, _buffers(args, fw, g, size)
        name = f"prof.{size}"

        def fresh_mpi():
            out = np.empty(n, np.float32)  # a new mapping each call (glibc mmaps blocks > 32 MiB)
            comm.Allreduce(a, out, op=MPI.SUM)

        def touch():
            out = np.empty(n, np.float32)
            out.fill(0)
        pieces = fw.split(t, GROUP_PIECES)  # made once: views for torch, copies for TF
        fns = {"hvdllm": lambda: fw.coll.allreduce(t, op="sum", name=name),
               f"hvdllm_grouped{GROUP_PIECES}": lambda: fw.coll.grouped_allreduce(pieces, op="sum", name=name + ".g")}
        buf = None
        if fw.inplace is not None:
            buf = fw.tensor(a.copy())  # its values double every call: harmless for timing
            fns["horovod_inplace"] = lambda: fw.inplace(buf, name + ".i")
        fns.update({"mpi4py": lambda: comm.Allreduce(a, r, op=MPI.SUM),
                    "mpi4py_fresh_out": fresh_mpi, "first_touch": touch})
        reps = reps_for(size, args.reps)
        slow = g.timed(fns, reps, args.warmup)
        # Horovod's own timeline of a few more calls, single and grouped (rank 0 writes it)
        tl = os.path.join(tl_dir, f"tl_{size}.json")
        phases = {}
        hvd = fw.hvd
        g.barrier()
        hvd.start_timeline(tl, mark_cycles=False)
        for _ in range(max(2, min(reps, 5))):
            g.barrier()
            fw.coll.allreduce(t, op="sum", name=name + ".tl")
            g.barrier()
            fw.coll.grouped_allreduce(pieces, op="sum", name=name + ".gtl")
        g.barrier()
        hvd.stop_timeline()
        g.barrier()
        if g.rank == 0:
            ph = timeline_phases(tl)
            for label, key in (("hvdllm", name + ".tl"), (f"hvdllm_grouped{GROUP_PIECES}", name + ".gtl")):
                mine = next((v for k, v in sorted(ph.items()) if key in k), {})
                phases[label] = {act: med(ds) for act, ds in mine.items()}
        fns = t = a = r = pieces = buf = None   # free the buffers before the next size
        gc.collect()
        if g.rank == 0:
            tl_said = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.get("hvdllm", {}).items())
            rows.append({"bytes": size, "size": human(size), "reps": reps,
                         "times_s": _said(tag, "profile", size, slow, 1, f"; timeline (hvdllm) {tl_said}"),
                         "timeline_median_s": phases})
    return rows


# ---------------------------------------------------------------------------------------------

def run(args, rt, backend) -> dict | None:
    from hvdllm import config as config_mod
    fw = Framework(args.backend, backend, rt)
    g = Group(rt.comm)
    tag = f"[bench aggregation] {args.backend} np={g.size}"
    load0, t0 = os.getloadavg(), time.perf_counter()
    out = {"backend": args.backend, "np": g.size, "launcher": rt.launcher, "sections": args.sections}

    def sections():
        for section in args.sections:
            fn = {"bandwidth": bandwidth, "compression": compression, "zero": zero, "profile": profile}[section]
            if g.rank == 0:
                common.say(tag + ":", f"{section} ...")
            out[section] = fn(args, fw, g, tag)
            g.barrier()
    _, foreign = g.measured(sections)
    if g.rank != 0:
        return None
    agg = config_mod.AggregationConfig()
    out.update({
        "horovod_settings": {"fusion_threshold_mb": args.fusion_threshold_mb, "cycle_time_ms": args.cycle_time_ms,
                             "HOROVOD_FUSION_THRESHOLD": os.environ.get("HOROVOD_FUSION_THRESHOLD"),
                             "HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME")},
        "defaults_note": f"0 = Horovod's defaults (128 MiB fusion buffer, 1 ms cycle); hvdllm's "
                         f"aggregation defaults: fusion_threshold_mb={agg.fusion_threshold_mb}, "
                         f"cycle_time_ms={agg.cycle_time_ms}",
        "threads_per_rank": args.threads, "reps": args.reps, "warmup": args.warmup,
        "wall_s": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "foreign_cpu_cores": foreign, **common.run_info(),
    })
    return out


def main(argv=None) -> int:
    args = parse(argv)
    from hvdllm import config as config_mod
    if "profile" in args.sections:  # Horovod reads it at init; a job with it is for profiling only
        os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
    agg = config_mod.AggregationConfig(fusion_threshold_mb=args.fusion_threshold_mb,
                                       cycle_time_ms=args.cycle_time_ms)
    return common.worker_main(args, lambda rt, backend: run(args, rt, backend), agg_cfg=agg,
                              what="bench aggregation (the mpi4py baseline)")


if __name__ == "__main__":
    sys.exit(main())
