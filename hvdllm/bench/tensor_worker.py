"""One rank of `hvdllm bench tensor`: times the forward + backward pass of a stack of GPT
transformer blocks split tensor-parallel over every rank, against the same blocks unsplit on one
rank, and records every collective the split blocks issue. Rank 0 writes the raw results;
hvdllm/bench/tensor.py (which launches this as `mpirun -np N python -m hvdllm.bench.tensor_worker`)
compares them with theory and prints the tables.

What one rank does, for each --width:
- builds the blocks (layers 1..L of the backend's own GPT, so exactly the code `parallel.tp`
  trains with) three times, from the same initial weights:
    tp<N>          split over the N ranks (tp group = the whole world), with a metered TPGroup:
                   every allreduce is counted, sized and timed (the library class, subclassed here,
                   so nothing in the library changes);
    tp<N>-compute  split the same way, but the metered group skips the collectives (it copies the
                   tensor instead): the split arithmetic alone, for the communication share;
    solo           (rank 0 only) the unsplit blocks: the np=1 step time, measured inside this job
                   while the other ranks sleep in a non-blocking barrier, interleaved with the
                   others (as bench dp's 'solo'), so drift between launches cannot bias the speed-up;
- one step of each as the count pass: the collectives it issues are recorded (direction,
  elements, bytes), and its output and input gradient are compared with the unsplit blocks'
  (evidence that the timed thing computes the same function);
- warm-up steps, then --steps timed steps per variant, interleaved in rounds with a barrier before
  each round (common.interleaved). torch: the seconds spent inside the allreduce calls of each
  timed step are summed per rank (horovod.torch's allreduce returns when the sum is in hand, so
  the time includes waiting for the slower rank). TensorFlow runs the step as one tf.function, so
  its collectives are counted when it is traced and their time cannot be taken apart.

A step is forward + backward of the blocks on a fixed random input (B, T, C) with a fixed random
output gradient; the input requires grad, as it does inside a model, so the backward also
computes the input gradient. No optimizer step: the block itself is what is measured.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from hvdllm.bench import common

# name: (width C, heads, sequence T, batch B)
MODELS = {
    "tiny": (64, 4, 16, 2),        # smoke tests only: latency dominates
    "small": (256, 4, 128, 4),
    "wide": (1024, 16, 128, 4),    # the default: wide enough that the split matmuls, not latency, dominate
    "wider": (2048, 32, 128, 4),
}


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.tensor_worker", __doc__, default="torch", steps=10, warmup=2)
    p.add_argument("--widths", required=True, help="comma list of widths C")
    p.add_argument("--heads", default="", help="comma list, one per width")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--layers", type=int, default=1, help="transformer blocks in the stack")
    a = p.parse_args(argv)
    a.widths = [int(w) for w in a.widths.split(",") if w.strip()]
    a.heads = [int(h) for h in a.heads.split(",") if h.strip()] or [max(1, w // 64) for w in a.widths]
    return a


def model_config(width: int, heads: int, seq: int, layers: int, tp: int):
    from hvdllm.config import ModelConfig
    # The vocabulary is never used by the blocks, but GPT shards every initial parameter, so it
    # must split evenly over tp.
    return ModelConfig(n_layer=layers, n_embd=width, n_head=heads, block_size=seq, vocab_size=64 * tp,
                       dropout=0.0)


def _size(t) -> tuple[int, int]:
    """(elements, bytes) of a torch or TensorFlow tensor (static shape under tf.function)."""
    if hasattr(t, "numel"):
        return int(t.numel()), int(t.numel() * t.element_size())
    n = int(t.shape.num_elements())
    return n, n * t.dtype.size


def metered_group(tp_cls, coll, communicate: bool, copy):
    """A TPGroup (of the backend's own class) that records every allreduce as
    (direction, elements, bytes, seconds) in `.calls`. With communicate=False it skips the
    collective and returns copy(t): the split arithmetic without communication."""

    class Metered(tp_cls):
        def __init__(self):
            super().__init__(coll)
            self.calls: list[tuple] = []

        def allreduce(self, t, direction, op="sum"):
            t0 = common.clock()
            if communicate:
                out = super().allreduce(t, direction, op)
            else:
                self.counts[direction] += 1
                out = copy(t)
            self.calls.append((direction, *_size(t), common.clock() - t0))
            return out
    return Metered()


# ---------------------------------------------------------------------------------------------
# the blocks, per backend: step() runs forward + backward once and returns (output, input grad)

class TorchBlocks:
    def __init__(self, cfg, seed, group, x, dy):
        import torch

        from torch_backend.model import GPT
        self.torch = torch
        self.layers = list(range(1, cfg.n_layer + 1))
        self.model = GPT(cfg, seed, layers=self.layers, tp=group)
        self.params = [p for _, p in self.model.named()]
        self.x, self.dy = torch.from_numpy(x), torch.from_numpy(dy)

    def step(self):
        for p in self.params:
            p.grad = None
        x = self.x.detach().requires_grad_()  # a fresh leaf: backward also computes dL/dx
        out = self.model.run_layers(self.layers, x)
        out.backward(self.dy)
        return out, x.grad

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @staticmethod
    def numpy(t):
        return t.detach().numpy()


class TFBlocks:
    def __init__(self, cfg, seed, group, x, dy):
        import tensorflow as tf

        from tf_backend.model import GPT
        self.layers = list(range(1, cfg.n_layer + 1))
        self.model = GPT(cfg, seed, layers=self.layers, tp=group)
        self.vars = self.model.variables_list
        self.x, self.dy = tf.constant(x), tf.constant(dy)
        self._step = tf.function(self._fwd_bwd)  # as tf_backend's Engine compiles its step

    def _fwd_bwd(self):
        import tensorflow as tf
        with tf.GradientTape() as tape:
            tape.watch(self.x)
            out = self.model.run_layers(self.layers, self.x)
        grads = tape.gradient(out, [self.x] + self.vars, output_gradients=self.dy)
        return out, grads[0], grads[1:]  # every gradient returned, so none is pruned away

    def step(self):
        out, dx, _ = self._step()
        return out, dx

    def param_bytes(self) -> int:
        return sum(int(v.shape.num_elements()) * v.dtype.size for v in self.vars)

    @staticmethod
    def numpy(t):
        return t.numpy()


def _backend_parts(backend: str):
    """(Blocks class, TPGroup class, Collectives class, copy for the compute-only group)."""
    if backend == "torch":
        from torch_backend.collectives import Collectives
        from torch_backend.tensor_parallel import TPGroup
        return TorchBlocks, TPGroup, Collectives, lambda t: t.clone()
    import tensorflow as tf

    from tf_backend.collectives import Collectives
    from tf_backend.tensor_parallel import TPGroup
    return TFBlocks, TPGroup, Collectives, tf.identity


# ---------------------------------------------------------------------------------------------

def rel_diff(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def build_width(args, rt, width: int, heads: int):
    """The three variants of one width: {name: (Blocks or None, metered group or None)}."""
    Blocks, TPGroup, Collectives, copy = _backend_parts(args.backend)
    n = rt.size
    cfg = model_config(width, heads, args.seq, args.layers, n)
    rng = np.random.default_rng(args.seed)  # the same input and output gradient on every rank
    x = rng.standard_normal((args.batch, args.seq, width)).astype(np.float32)
    dy = rng.standard_normal((args.batch, args.seq, width)).astype(np.float32)
    variants = {}
    for name, communicate in ((f"tp{n}", True), (f"tp{n}-compute", False)):
        group = metered_group(TPGroup, Collectives(), communicate, copy)
        variants[name] = (Blocks(cfg, args.seed, group, x, dy), group)
    variants["solo"] = (Blocks(cfg, args.seed, None, x, dy) if rt.rank == 0 else None, None)
    return cfg, variants


def count_pass(variants, tp_name: str, numpy_of, timed: bool) -> dict:
    """One step of each variant: the tp variant's collectives, and its output and input gradient
    against the unsplit blocks' (on rank 0, where they run)."""
    results = {}
    for name, (blocks, group) in variants.items():
        if group is not None:
            group.calls = []
        if blocks is not None:
            out, dx = blocks.step()
            results[name] = (numpy_of(out), numpy_of(dx))
    # Under tf.function the collectives are recorded while the step is traced: no time to keep.
    calls = {name: [[d, n, b, s if timed else None] for d, n, b, s in g.calls]
             for name, (_, g) in variants.items() if g is not None}
    check = {}
    if "solo" in results:
        ref_out, ref_dx = results["solo"]
        check = {"output_rel_diff": rel_diff(results[tp_name][0], ref_out),
                 "input_grad_rel_diff": rel_diff(results[tp_name][1], ref_dx)}
    return {"calls": calls, "check": check}


def timed_fns(variants, tp_name: str, comm_s: list, backend: str) -> dict:
    """{name: step function} for common.interleaved. The tp variant's function (torch) also
    appends the seconds its allreduces took to comm_s."""
    fns = {}
    for name, (blocks, group) in variants.items():
        if blocks is None:  # solo on the other ranks: they wait while rank 0 runs it
            fns[name] = None
        elif name == tp_name and backend == "torch":
            def step(blocks=blocks, group=group):
                group.calls = []
                blocks.step()
                comm_s.append(sum(c[3] for c in group.calls))
            fns[name] = step
        else:
            fns[name] = blocks.step
    return fns


def run(args, rt, backend) -> dict | None:
    n, ranks = rt.size, common.Ranks(rt.comm)
    tp_name = f"tp{n}"
    Blocks = _backend_parts(args.backend)[0]
    t_setup = time.perf_counter()
    widths, fns, comm_s = [], {}, {}
    for width, heads in zip(args.widths, args.heads):
        cfg, variants = build_width(args, rt, width, heads)
        counted = count_pass(variants, tp_name, Blocks.numpy, args.backend == "torch")
        comm_s[width] = []
        for name, fn in timed_fns(variants, tp_name, comm_s[width], args.backend).items():
            fns[f"{width}/{name}"] = fn
        widths.append({"width": width, "heads": heads, "cfg": cfg, "counted": counted,
                       "param_bytes": {name: b.param_bytes() if b is not None else None
                                       for name, (b, _) in variants.items()}})
    setup_s = time.perf_counter() - t_setup
    tag = f"[bench tensor] {args.backend} np={n}:"
    if rt.rank == 0:
        common.say(tag, f"variants {', '.join(fns)}; {args.warmup} warm-up + {args.steps} timed steps "
                        f"each, interleaved {args.per_round} at a time")
    t_run = time.perf_counter()
    times, foreign = ranks.measured(lambda: common.interleaved(
        fns, args.steps, args.warmup, args.per_round, before=ranks.barrier,
        solo=[k for k in fns if k.endswith("/solo")], idle=ranks.idle,
        progress=tag if rt.rank == 0 else None))
    timed_wall_s = time.perf_counter() - t_run
    # the warm-up steps ran first: keep the timed steps' allreduce seconds only
    mine = {"times": times, "comm_s": {w: c[args.warmup:] for w, c in comm_s.items()},
            "param_bytes": {w["width"]: w["param_bytes"] for w in widths},
            "calls": {w["width"]: w["counted"]["calls"] for w in widths}}
    every = ranks.gather(mine)
    if rt.rank != 0:
        return None
    return result(args, rt, widths, every, {
        "setup_s": setup_s, "timed_wall_s": timed_wall_s, "foreign_cpu_cores": foreign})


def result(args, rt, widths, every, extra) -> dict:
    """Rank 0's raw output: per width, each variant's step times (a step ends when its slowest
    rank is done; solo is rank 0's alone), every rank's allreduce seconds and recorded calls."""
    n = rt.size
    out_widths = []
    for w in widths:
        width, cfg = w["width"], w["cfg"]
        variants = {}
        for name in w["param_bytes"]:
            key, who = f"{width}/{name}", every if name != "solo" else every[:1]
            variants[name] = {**common.step_stats([e["times"][key] for e in who]),
                              "param_bytes_per_rank": [e["param_bytes"][width][name] for e in who]}
        out_widths.append({
            "width": width, "heads": w["heads"],
            "model_config": {k: v for k, v in common.model_shape(cfg).items() if k != "vocab_size"},
            "variants": variants,
            "comm_s_per_rank": [e["comm_s"][width] for e in every] if args.backend == "torch" else None,
            "calls_per_rank": [e["calls"][width] for e in every],
            "check": w["counted"]["check"],
        })
    threads = None
    if args.backend == "torch":
        import torch
        threads = torch.get_num_threads()
    return {
        "benchmark": "tensor-raw", "backend": args.backend, "np": n, "tp": n, "launcher": rt.launcher,
        "seq": args.seq, "batch": args.batch, "layers": args.layers, "widths": out_widths,
        "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round,
        "rounds": len(common.rounds_for(args.steps, args.per_round)), "threads_per_rank": args.threads,
        "torch_threads": threads, **extra, **common.run_info(),
    }


def main(argv=None) -> int:
    args = parse(argv)
    return common.worker_main(args, lambda rt, backend: run(args, rt, backend), min_ranks=2,
                              what="the tensor-parallel benchmark (its barriers and gathers)")


if __name__ == "__main__":
    sys.exit(main())
