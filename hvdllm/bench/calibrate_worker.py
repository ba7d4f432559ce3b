"""One rank of `hvdllm bench calibrate`: measures, on every rank at once (as training loads the
node), what `hvdllm plan` needs. Rank 0 writes the raw results; hvdllm/bench/calibrate.py fits
and writes the calibration JSON.

- compute: forward + backward of the backend's own GPT (torch_backend.GPT, the code `hvdllm
  train` runs) on random tokens, at each --batches size: seconds per step, with the model's
  training FLOPs per step (params.flops_per_token x tokens);
- peak: a square fp32 matrix product (torch.mm) of --matmul size: the FLOP/s this device reaches
  at best, the reference of MFU;
- memory bandwidth: numpy copies of a --copy-mb buffer (read + write);
- Horovod collectives (the library's torch Collectives over the world): allreduce,
  reducescatter, allgather of float32 buffers of each --sizes (bytes), each timed as the slowest
  rank's median;
- point-to-point: ping-pong between ranks 0 and 1 over mpi/p2p's send_array / recv_array (the
  pipeline's own path) at each --sizes, the one-way time as half the round trip;
- memory per device: MemTotal / the ranks on this node.
Every timing is a median over --reps after one warm-up.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np

from hvdllm.bench import common


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.calibrate_worker", __doc__, default="torch", choices=("torch",))
    p.add_argument("--model", required=True, help="n_layer,n_embd,n_head,block_size,vocab_size")
    p.add_argument("--batches", required=True, help="comma list of sequences per step")
    p.add_argument("--sizes", required=True, help="comma list of message sizes in bytes")
    p.add_argument("--matmul", type=int, default=512)
    p.add_argument("--copy-mb", type=float, default=64.0)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    a.model = [int(v) for v in a.model.split(",")]
    a.batches = [int(v) for v in a.batches.split(",")]
    a.sizes = [int(v) for v in a.sizes.split(",")]
    return a


def _median_time(fn, reps: int, sync=lambda: None) -> float:
    fn()                                     # warm-up: allocation, first-call costs
    ts = []
    for _ in range(reps):
        sync()
        t0 = common.clock()
        fn()
        ts.append(common.clock() - t0)
    return statistics.median(ts)


def measure_compute(args, comm) -> dict:
    import torch

    from hvdllm import params
    from torch_backend import GPT
    n_layer, n_embd, n_head, block, vocab = args.model
    cfg = common.gpt_config((n_layer, n_embd, n_head, block, vocab, 1), args.seed)
    model = GPT(cfg.model, args.seed)
    rng = np.random.default_rng(args.seed + comm.Get_rank())
    points = []
    for b in args.batches:
        x = torch.from_numpy(rng.integers(0, vocab, (b, block)))

        def step():
            for _, p in model.named():
                p.grad = None
            model.loss(x, x).backward()
        t = _median_time(step, args.reps, comm.Barrier)
        points.append({"batch": b, "tokens": b * block, "flops": params.flops_per_token(cfg.model) * b * block,
                       "seconds": t})
    n = args.matmul
    a, w = torch.randn(n, n), torch.randn(n, n)
    t_mm = _median_time(lambda: torch.mm(a, w), max(args.reps, 5), comm.Barrier)
    buf = np.ones(int(args.copy_mb * common.MB) // 8)
    dst = np.empty_like(buf)
    t_copy = _median_time(lambda: np.copyto(dst, buf), args.reps, comm.Barrier)
    return {"points": points, "layers": params.n_layers(cfg.model), "matmul_n": n,
            "matmul_flops": 2.0 * n ** 3 / t_mm, "copy_bytes": 2 * buf.nbytes,
            "memory_bandwidth": 2 * buf.nbytes / t_copy}


def measure_collectives(args, rt, ranks: common.Ranks) -> dict:
    import torch

    from torch_backend import Collectives
    coll = Collectives()
    n = rt.size
    out = {}
    for kind in ("allreduce", "reducescatter", "allgather"):
        rows = []
        for size in args.sizes:
            elems = max(n, size // 4 // n * n)           # divisible by n: equal reduce-scatter shards
            full = torch.ones(elems)
            part = torch.ones(elems // n)
            fn = {"allreduce": lambda: coll.allreduce(full, op="sum", name=f"cal.ar.{elems}"),
                  "reducescatter": lambda: coll.reducescatter(full, op="sum", name=f"cal.rs.{elems}"),
                  "allgather": lambda: coll.allgather(part, name=f"cal.ag.{elems}")}[kind]
            t = _median_time(fn, args.reps, ranks.barrier)
            rows.append({"bytes": 4 * elems, "seconds": max(ranks.comm.allgather(t))})
        out[kind] = rows
    return out


def measure_p2p(args, comm, timeout_s: float = 60.0) -> list:
    from mpi import p2p
    r = comm.Get_rank()
    rows = []
    for size in args.sizes:
        a = np.ones(max(1, size // 4), np.float32)

        def pingpong():
            if r == 0:
                p2p.send_array(comm, a, 1, "act", 0, timeout_s)
                p2p.recv_array(comm, 1, "grad", 0, timeout_s)
            elif r == 1:
                got = p2p.recv_array(comm, 0, "act", 0, timeout_s)
                p2p.send_array(comm, got, 0, "grad", 0, timeout_s)
        t = _median_time(pingpong, args.reps, comm.Barrier)
        rows.append({"bytes": a.nbytes, "seconds": comm.bcast(t / 2, root=0)})
    return rows


def node_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def body(args):
    def run(rt, backend):
        ranks = common.Ranks(rt.comm)
        t0 = time.monotonic()
        compute = measure_compute(args, rt.comm)
        gc.collect()
        coll = measure_collectives(args, rt, ranks) if rt.size > 1 else {}
        p2p_rows = measure_p2p(args, rt.comm) if rt.size > 1 else []
        every = ranks.gather(compute)
        if rt.rank != 0:
            return None
        total = node_memory_bytes()
        return {"np": rt.size, "local_size": rt.local_size, "model": args.model, "batches": args.batches,
                "sizes": args.sizes, "reps": args.reps, "compute": every, "collectives": coll,
                "p2p": p2p_rows, "node_memory_bytes": total,
                "memory_per_device": total // max(1, rt.local_size) if total else None,
                "threads": args.threads, "cpus": os.cpu_count(), "seconds": time.monotonic() - t0,
                "info": common.run_info()}
    return run


def main(argv=None) -> int:
    args = parse(argv)
    return common.worker_main(args, body(args), what="hvdllm bench calibrate")


if __name__ == "__main__":
    raise SystemExit(main())
