"""One rank of `hvdllm bench dp`: times data-parallel training steps of several variants on the
same GPT, the same batches and the same AdamW, interleaved in rounds in ONE process group.

Started by hvdllm/bench/dp.py as `mpirun -np N ... python -m hvdllm.bench.dp_worker --backend B`.
Variants (every one: forward, backward, gradient average over all ranks, global-norm clip,
AdamW with decoupled weight decay on matrices and embeddings only, identical hyper-parameters):

- hvdllm: the product's own path, `Engine(cfg, layout).train_step(x, y, lr)`;
- hand:   the most direct hand-written Horovod loop on an identical model.
          torch: hvd.broadcast_parameters + hvd.DistributedOptimizer(torch.optim.AdamW), i.e.
          per-tensor allreduces started by backward hooks (overlapped with backward), then
          synchronize(), clip, `with skip_synchronize(): step()` (Horovod's documented way to clip).
          tensorflow: tf.GradientTape, hvd.grouped_allreduce(grads), tf.clip_by_global_norm and a
          plain AdamW update, all in one tf.function (DistributedGradientTape fails on Keras 3);
- ddp:    (torch only) torch.nn.parallel.DistributedDataParallel over torch.distributed's gloo
          in the same processes, AdamW, clip_grad_norm_.

- solo:   (np > 1) rank 0 alone runs the hand-written step without any message while the other
          ranks wait: the single-rank step time measured interleaved in this process group, so
          the scaling efficiency solo / variant is not at the mercy of drift between launches.

Neither `hand` nor `ddp` reads or averages the loss; `hvdllm` returns the averaged loss and the
gradient norm as Python floats (what its trainer logs): part of what is being compared.
Each rank times its own steps; a step's time is the slowest rank's, and the figure is the median.
Rank 0 writes the JSON (--out).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time

import numpy as np

from hvdllm.bench import common

# name: (n_layer, n_embd, n_head, block_size, vocab_size, micro-batch per rank)
MODELS = {
    "tiny": (2, 32, 2, 32, 256, 4),     # smoke tests only
    "small": (4, 256, 4, 128, 256, 8),
    "medium": (6, 384, 6, 128, 256, 8),
    "large": (8, 512, 8, 128, 256, 8),
}
VARIANTS = {"torch": ("hvdllm", "hand", "ddp"), "tensorflow": ("hvdllm", "hand")}
BACKEND_MODULES = {"torch": "torch_backend", "tensorflow": "tf_backend"}
LR = 1e-3


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m hvdllm.bench.dp_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=list(VARIANTS))
    p.add_argument("--model", default="medium", choices=list(MODELS))
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--per-round", type=int, default=1,
                   help="consecutive steps of one variant before switching to the next")
    p.add_argument("--variants", default="", help="comma list (default: all for the backend)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip in every variant; 0 = none")
    p.add_argument("--no-solo", action="store_true",
                   help="skip 'solo' (rank 0 steps alone, without messages, interleaved with the "
                        "others: the np=1 time measured in this process group, for scaling)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--ddp-port", type=int, default=0, help="torch.distributed port (0: rank 0 picks)")
    p.add_argument("--out", default="", help="JSON written by rank 0")
    return p.parse_args(argv)


def model_config(name: str, grad_clip: float = 1.0, seed: int = 1337):
    """The hvdllm Config the benchmark uses for `name`, and the micro-batch per rank."""
    from hvdllm import config as config_mod
    n_layer, n_embd, n_head, block, vocab, batch = MODELS[name]
    cfg = config_mod.Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size = n_layer, n_embd, n_head, block
    m.vocab_size, m.dropout = vocab, 0.0
    cfg.train.batch_size, cfg.train.seed, cfg.train.threads = batch, seed, 1
    cfg.optim.grad_clip = grad_clip
    return cfg


def param_count(name: str) -> int:
    from hvdllm.params import count
    return count(model_config(name).model)


def make_batches(cfg, rank: int, seed: int, n: int = 4):
    """n random (x, y) int64 batches of this rank's micro-batch, from a fixed numpy seed."""
    rng = np.random.default_rng([seed, rank])
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    out = []
    for _ in range(n):
        toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])))
    return out


def _cycler(batches):
    state = {"i": 0}

    def nxt():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b
    return nxt


def product_engine(backend, cfg, layout, rt):
    """The engine exactly as `hvdllm train` builds it (make_engine picks the data-parallel
    Engine for this layout), falling back to Engine(cfg, layout)."""
    if hasattr(backend, "make_engine"):
        return backend.make_engine(cfg, layout, rt)
    return backend.Engine(cfg, layout)


def _groups(named, optim_cfg):
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [{"params": decay, "weight_decay": optim_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# torch

def torch_variants(cfg, layout, rt, batches, wanted, ddp_port):
    import horovod.torch as hvd
    import torch
    import torch.distributed as dist

    import torch_backend
    from torch_backend.model import GPT

    o, clip = cfg.optim, cfg.optim.grad_clip
    fns, closers, weights = {}, [], {}
    adamw = dict(lr=LR, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)  # as torch_backend's

    if "hvdllm" in wanted:
        eng = product_engine(torch_backend, cfg, layout, rt)
        nxt = _cycler(batches)

        def hvdllm_step():
            x, y = nxt()
            eng.train_step(x, y, LR)
        fns["hvdllm"] = hvdllm_step
        weights["hvdllm"] = lambda: [p.detach().numpy() for p in eng.params]

    if "hand" in wanted:
        model = GPT(cfg.model, cfg.train.seed)
        named = model.named()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(_groups(named, o), **adamw),
                                       named_parameters=named)
        params = [p for _, p in named]
        nxt_h = _cycler(batches)

        def hand_step():
            x, y = nxt_h()
            opt.zero_grad()
            loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            if clip > 0:
                opt.synchronize()
                torch.nn.utils.clip_grad_norm_(params, clip)
                with opt.skip_synchronize():
                    opt.step()
            else:
                opt.step()
        fns["hand"] = hand_step
        weights["hand"] = lambda: [p.detach().numpy() for p in params]

    if "solo" in wanted:  # rank 0 alone, no messages, while the others wait: np=1 in this group
        gpt_s = GPT(cfg.model, cfg.train.seed)
        params_s = [p for _, p in gpt_s.named()]
        opt_s = torch.optim.AdamW(_groups(gpt_s.named(), o), **adamw)
        nxt_s = _cycler(batches)

        def solo_step():
            x, y = nxt_s()
            opt_s.zero_grad(set_to_none=True)
            gpt_s.loss(torch.from_numpy(x), torch.from_numpy(y)).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params_s, clip)
            opt_s.step()
        fns["solo"] = solo_step if rt.rank == 0 else (lambda: None)

    if "ddp" in wanted:
        if not ddp_port:
            ddp_port = hvd.broadcast_object(_free_port() if rt.rank == 0 else 0, root_rank=0,
                                            name="bench.ddp_port")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(ddp_port)
        import datetime
        dist.init_process_group("gloo", rank=rt.rank, world_size=rt.size,
                                timeout=datetime.timedelta(seconds=300))
        closers.append(dist.destroy_process_group)

        class LossOf(torch.nn.Module):  # DDP's hooks run through forward(): wrap model.loss
            def __init__(self, gpt):
                super().__init__()
                self.gpt = gpt

            def forward(self, x, y):
                return self.gpt.loss(x, y)

        gpt = GPT(cfg.model, cfg.train.seed)
        ddp = torch.nn.parallel.DistributedDataParallel(LossOf(gpt))  # broadcasts rank 0's weights
        named_d = gpt.named()
        opt_d = torch.optim.AdamW(_groups(named_d, o), **adamw)
        params_d = [p for _, p in named_d]
        nxt_d = _cycler(batches)

        def ddp_step():
            x, y = nxt_d()
            opt_d.zero_grad(set_to_none=True)
            loss = ddp(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params_d, clip)
            opt_d.step()
        fns["ddp"] = ddp_step
        weights["ddp"] = lambda: [p.detach().numpy() for p in params_d]

    def barrier():
        hvd.barrier()

    def gather(obj):
        return hvd.allgather_object(obj, name="bench.gather")
    return fns, weights, barrier, gather, closers


# ---------------------------------------------------------------------------------------------
# tensorflow

def tf_variants(cfg, layout, rt, batches, wanted, ddp_port):
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import tf_backend
    from tf_backend.model import GPT

    o, clip = cfg.optim, cfg.optim.grad_clip
    fns, weights = {}, {}

    if "hvdllm" in wanted:
        eng = product_engine(tf_backend, cfg, layout, rt)
        nxt = _cycler(batches)

        def hvdllm_step():
            x, y = nxt()
            eng.train_step(x, y, LR)
        fns["hvdllm"] = hvdllm_step
        weights["hvdllm"] = lambda: [v.numpy() for v in eng.vars]

    def tf_loop(reduce: bool):
        """The hand-written loop: tape, grouped allreduce (when `reduce`), clip, AdamW."""
        model = GPT(cfg.model, cfg.train.seed)
        variables = list(model.params.values())
        if reduce:
            hvd.broadcast_variables(variables, root_rank=0)
        m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        v2 = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        decay = [len(v.shape) >= 2 for v in variables]
        t = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        b1, b2, eps, wd = o.beta1, o.beta2, o.eps, o.weight_decay
        reduce = reduce and hvd.size() > 1

        @tf.function
        def step_tf(x, y):
            with tf.GradientTape() as tape:
                loss = model.loss(x, y, training=True)
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
            if reduce:
                grads = hvd.grouped_allreduce(grads, op=hvd.Average)
            if clip > 0:
                grads, _ = tf.clip_by_global_norm(grads, clip)
            t.assign_add(1.0)
            step_size = LR / (1.0 - tf.pow(b1, t))
            bc2 = tf.sqrt(1.0 - tf.pow(b2, t))
            for p, g, mm, vv, d in zip(variables, grads, m, v2, decay):
                if d and wd:
                    p.assign(p * (1.0 - LR * wd))
                mm.assign(b1 * mm + (1.0 - b1) * g)
                vv.assign(b2 * vv + (1.0 - b2) * g * g)
                p.assign_sub(step_size * mm / (tf.sqrt(vv) / bc2 + eps))
            return loss
        nxt_h = _cycler(batches)

        def step():
            x, y = nxt_h()  # numpy, as the Engine gets them
            step_tf(tf.constant(x), tf.constant(y))
        return step, lambda: [v.numpy() for v in variables]

    if "hand" in wanted:
        fns["hand"], weights["hand"] = tf_loop(reduce=True)
    if "solo" in wanted:
        fns["solo"] = tf_loop(reduce=False)[0] if rt.rank == 0 else (lambda: None)

    one = tf.zeros([1])

    def barrier():  # horovod.tensorflow has no barrier(): a one-float allreduce does the same
        hvd.allreduce(one, name="bench.barrier").numpy()

    def gather(obj):
        return hvd.allgather_object(obj, name="bench.gather")
    return fns, weights, barrier, gather, []


def weight_agreement(w: dict[str, list]) -> dict[str, float]:
    """Relative distance ||w_v - w_first|| / ||w_first|| (all weights as one vector) between each
    variant and the first after the same steps on the same batches: evidence that every variant
    does the same arithmetic. torch variants agree bit for bit. The TF variants differ in
    rounding only (float64 vs float32 Adam scalars, clip formula): ~2e-6 after the warm-up, but
    training on random tokens at lr 1e-3 amplifies rounding chaotically (medium, np=1: 1.7e-6 at
    step 3, 4.7e-5 at 17, 1e-2 at 33), hence the check after the warm-up."""
    names = list(w)
    if not names:
        return {}
    ref = w[names[0]]
    ref_sq = sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in ref)
    out = {}
    for n in names[1:]:
        d_sq = sum(float(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(w[n], ref))
        out[n] = (d_sq / ref_sq) ** 0.5 if ref_sq > 0 else d_sq ** 0.5
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------

def run(args, rt) -> dict | None:
    import importlib

    from hvdllm import config as config_mod
    from hvdllm.layout import Layout

    backend = importlib.import_module(BACKEND_MODULES[args.backend])
    backend.configure(args.threads, args.seed)
    cfg = config_mod.validate(model_config(args.model, args.grad_clip, args.seed), rt.size)
    layout = (Layout.from_config(cfg, rt.size, rt.rank) if hasattr(Layout, "from_config")
              else Layout.build(cfg.parallel, rt.size, rt.rank))
    wanted = [v for v in (args.variants.split(",") if args.variants else VARIANTS[args.backend]) if v]
    unknown = [v for v in wanted if v not in VARIANTS[args.backend]]
    if rt.size > 1 and not args.no_solo:
        wanted.append("solo")
    if unknown:
        raise ValueError(f"--variants: {unknown} not available for {args.backend} "
                         f"(choose from {', '.join(VARIANTS[args.backend])})")
    batches = make_batches(cfg, rt.rank, args.seed)
    build = torch_variants if args.backend == "torch" else tf_variants
    t0 = time.perf_counter()
    fns, weights, barrier, gather, closers = build(cfg, layout, rt, batches, wanted, args.ddp_port)
    fns = {v: fns[v] for v in wanted}
    setup_s = time.perf_counter() - t0
    tag = f"[bench dp] {args.backend} np={rt.size} {args.model}"

    def progress(r, n):
        if rt.rank == 0:
            print(f"{tag}: round {r}/{n} done ({time.perf_counter() - t1:.1f} s)",
                  file=sys.stderr, flush=True)
    if rt.rank == 0:
        print(f"{tag}: variants {', '.join(fns)}; {args.warmup} warm-up + {args.steps} timed steps "
              f"each, interleaved {args.per_round} at a time", file=sys.stderr, flush=True)
    barrier()
    load0, cpu0 = os.getloadavg(), common.cpu_snapshot()
    t1 = time.perf_counter()
    early = {}

    def compare_early():
        early.update(weight_agreement({v: weights[v]() for v in fns if v in weights}))
    times = common.interleaved(fns, args.steps, args.warmup, args.per_round, progress, barrier,
                               compare_early)
    barrier()
    cpu1 = common.cpu_snapshot()
    all_times = gather(times)  # one dict per rank
    own_cpu = sum(gather(cpu1["self_s"] - cpu0["self_s"]))  # CPU seconds of every rank
    agreement = weight_agreement({v: weights[v]() for v in fns if v in weights})
    for close in closers:
        close()
    if rt.rank != 0:
        return None
    m = cfg.model
    tokens = rt.size * cfg.train.batch_size * m.block_size
    variants = {}
    for v in fns:
        per_rank = [t[v] for t in all_times] if v != "solo" else [all_times[0][v]]
        slowest = [max(ts) for ts in zip(*per_rank)]  # a step ends when its slowest rank is done
        s = common.summarize(slowest)
        tok = tokens // rt.size if v == "solo" else tokens
        s.update({"rank0_median_s": common.summarize(per_rank[0])["median_s"],
                  "rank_medians_s": [common.summarize(ts)["median_s"] for ts in per_rank],
                  "tokens_per_step": tok, "tokens_per_s": tok / s["median_s"],
                  "step_times_s": slowest})
        variants[v] = s
    return {
        "backend": args.backend, "np": rt.size, "launcher": rt.launcher, "model": args.model,
        "model_config": {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
                         "block_size": m.block_size, "vocab_size": m.vocab_size},
        "params": param_count(args.model), "batch_per_rank": cfg.train.batch_size,
        "tokens_per_step": tokens, "threads_per_rank": args.threads, "grad_clip": args.grad_clip,
        "lr": LR, "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round,
        "rounds": len(common.rounds_for(args.steps, args.per_round)), "setup_s": setup_s,
        "variants": variants, "weights_rel_diff_after_warmup": early,
        "weights_rel_diff_vs_first": agreement,
        "host": platform.node(), "cores": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "foreign_cpu_cores": common.foreign_cores(cpu0, cpu1, own_cpu),
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("HOROVOD_", "OMPI_MCA_")) or k in ("OMP_NUM_THREADS",)},
    }


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import importlib

    from hvdllm import runtime
    backend = importlib.import_module(BACKEND_MODULES[args.backend])
    _, result = runtime.run_guarded(lambda: runtime.start(backend), lambda rt: run(args, rt))
    if result is not None and args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
