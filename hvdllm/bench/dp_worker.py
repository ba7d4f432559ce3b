"""One rank of `hvdllm bench dp`: times data-parallel training steps of several variants on the
same GPT, the same batches and the same AdamW, interleaved in rounds in ONE process group.

Started by hvdllm/bench/dp.py as `mpirun -np N ... python -m hvdllm.bench.dp_worker --backend B`.
Variants (every one: forward, backward, gradient average over all ranks, global-norm clip,
AdamW with decoupled weight decay on matrices and embeddings only, identical hyper-parameters):

- hvdllm: the product's own path: the engine `hvdllm train` builds (parallelize.build_engine),
          `engine.train_step(x, y, lr)`;
- hand:   the most direct hand-written Horovod loop on an identical model.
          torch: hvd.broadcast_parameters + hvd.DistributedOptimizer(torch.optim.AdamW), i.e.
          per-tensor allreduces started by backward hooks (overlapped with backward), then
          synchronize(), clip, `with skip_synchronize(): step()` (Horovod's documented way to clip).
          tensorflow: tf.GradientTape, hvd.grouped_allreduce(grads), a global-norm clip and a
          plain AdamW update written out as torch computes them, all in one tf.function
          (DistributedGradientTape fails on Keras 3);
- ddp:    (torch only) torch.nn.parallel.DistributedDataParallel over torch.distributed's gloo
          in the same processes, AdamW, clip_grad_norm_.

- solo:   (np > 1) rank 0 alone runs the hand-written step without any message while the other
          ranks sleep in a non-blocking barrier: the single-rank step time measured interleaved
          in this process group, so the scaling efficiency solo / variant is not at the mercy of
          drift between launches.

Neither `hand` nor `ddp` reads or averages the loss; `hvdllm` returns the averaged loss and the
gradient norm as Python floats (what its trainer logs): part of what is being compared.
Each rank times its own steps; a step's time is the slowest rank's, and the figure is the median.
Rank 0 writes the JSON (--out).
"""
from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np

from hvdllm.bench import common

MODELS = common.GPT_MODELS
VARIANTS = {"torch": ("hvdllm", "hand", "ddp"), "tensorflow": ("hvdllm", "hand")}
LR = 1e-3


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.dp_worker", __doc__, VARIANTS, steps=30, warmup=3)
    p.add_argument("--model", default="medium", choices=list(MODELS))
    p.add_argument("--variants", default="", help="comma list (default: all for the backend)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip in every variant; 0 = none")
    p.add_argument("--no-solo", action="store_true",
                   help="skip 'solo' (rank 0 steps alone, without messages, interleaved with the "
                        "others: the np=1 time measured in this process group, for scaling)")
    p.add_argument("--ddp-port", type=int, default=0, help="torch.distributed port (0: rank 0 picks)")
    return p.parse_args(argv)


def model_config(name: str, grad_clip: float = 1.0, seed: int = 1337):
    """The hvdllm Config the benchmark uses for `name`."""
    cfg = common.gpt_config(MODELS[name], seed)
    cfg.optim.grad_clip = grad_clip
    return cfg


def param_count(name: str) -> int:
    from hvdllm.params import count
    return count(model_config(name).model)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(named, optim_cfg):
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [{"params": decay, "weight_decay": optim_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# torch

def torch_variants(cfg, rt, engine, batches, wanted, ddp_port):
    import horovod.torch as hvd
    import torch
    import torch.distributed as dist

    from torch_backend.model import GPT

    o, clip = cfg.optim, cfg.optim.grad_clip
    fns, closers, weights = {}, [], {}
    adamw = dict(lr=LR, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)  # as torch_backend's

    if "hvdllm" in wanted:
        nxt = common.cycle(batches)
        fns["hvdllm"] = lambda: engine.train_step(*nxt(), LR)
        weights["hvdllm"] = lambda: [p.detach().numpy() for p in engine.params]

    if "hand" in wanted:
        model = GPT(cfg.model, cfg.train.seed)
        named = model.named()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(_groups(named, o), **adamw),
                                       named_parameters=named)
        params = [p for _, p in named]
        nxt_h = common.cycle(batches)

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

    if "solo" in wanted and rt.rank == 0:  # rank 0 alone, no messages: np=1 in this group
        gpt_s = GPT(cfg.model, cfg.train.seed)
        params_s = [p for _, p in gpt_s.named()]
        opt_s = torch.optim.AdamW(_groups(gpt_s.named(), o), **adamw)
        nxt_s = common.cycle(batches)

        def solo_step():
            x, y = nxt_s()
            opt_s.zero_grad(set_to_none=True)
            gpt_s.loss(torch.from_numpy(x), torch.from_numpy(y)).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params_s, clip)
            opt_s.step()
        fns["solo"] = solo_step

    if "ddp" in wanted:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(ddp_port or rt.comm.bcast(free_port() if rt.rank == 0 else 0))
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
        nxt_d = common.cycle(batches)

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
    return fns, weights, closers


# ---------------------------------------------------------------------------------------------
# tensorflow

def tf_variants(cfg, rt, engine, batches, wanted, ddp_port):
    import horovod.tensorflow as hvd
    import tensorflow as tf

    from tf_backend.model import GPT

    o, clip = cfg.optim, cfg.optim.grad_clip
    fns, weights = {}, {}

    if "hvdllm" in wanted:
        nxt = common.cycle(batches)
        fns["hvdllm"] = lambda: engine.train_step(*nxt(), LR)
        weights["hvdllm"] = lambda: [v.numpy() for v in engine.vars]

    def tf_loop(reduce: bool):
        """The hand-written loop: tape, grouped allreduce (when `reduce`), clip, AdamW."""
        model = GPT(cfg.model, cfg.train.seed)
        variables = list(model.params.values())
        if reduce:
            hvd.broadcast_variables(variables, root_rank=0)
        m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        v2 = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        decay = [len(v.shape) >= 2 for v in variables]
        t = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        b1, b2, eps, wd = o.beta1, o.beta2, o.eps, o.weight_decay
        reduce = reduce and hvd.size() > 1

        # torch's update, written out, so hvdllm and this loop can be compared weight for weight
        # (the check after the run): the clip factor min(1, c / (norm + 1e-6)) of
        # clip_grad_norm_, not tf.clip_by_global_norm's c / max(norm, c), and the step's scalars
        # formed in float64 and rounded once, traced for any batch shape as the Engine's step is
        # (a graph traced for static shapes picks other kernels). Any one of the three alone
        # leaves a 1e-7 difference that 30 AdamW steps on random tokens grow to ~1e-2.
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64)] * 2)
        def step_tf(x, y):
            with tf.GradientTape() as tape:
                loss = model.loss(x, y, training=True)
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
            if reduce:
                grads = hvd.grouped_allreduce(grads, op=hvd.Average)
            if clip > 0:
                norm = tf.norm(tf.stack([tf.norm(g) for g in grads]))
                coef = tf.minimum(clip / (norm + 1e-6), 1.0)
                grads = [g * coef for g in grads]
            t.assign_add(1.0)
            step_size = tf.cast(LR / (1.0 - tf.pow(tf.constant(b1, tf.float64), t)), tf.float32)
            bc2 = tf.cast(tf.sqrt(1.0 - tf.pow(tf.constant(b2, tf.float64), t)), tf.float32)
            shrink = tf.cast(1.0 - LR * wd, tf.float32)
            for p, g, mm, vv, d in zip(variables, grads, m, v2, decay):
                if d and wd:
                    p.assign(p * shrink)
                mm.assign(b1 * mm + (1.0 - b1) * g)
                vv.assign(b2 * vv + (1.0 - b2) * g * g)
                p.assign_sub(step_size * mm / (tf.sqrt(vv) / bc2 + eps))
            return loss
        nxt_h = common.cycle(batches)

        def step():
            x, y = nxt_h()  # numpy, as the Engine gets them
            step_tf(tf.constant(x), tf.constant(y))
        return step, lambda: [v.numpy() for v in variables]

    if "hand" in wanted:
        fns["hand"], weights["hand"] = tf_loop(reduce=True)
    if "solo" in wanted and rt.rank == 0:
        fns["solo"] = tf_loop(reduce=False)[0]
    return fns, weights, []


def weight_agreement(w: dict[str, list]) -> dict[str, float]:
    """Relative distance ||w_v - w_first|| / ||w_first|| (all weights as one vector) between each
    variant and the first after the same steps on the same batches: evidence that every variant
    does the same arithmetic, in both frameworks bit for bit (0.0) when it does. Checked after
    the warm-up too: a difference in rounding alone grows over the steps."""
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


# ---------------------------------------------------------------------------------------------

def run(args, rt, backend) -> dict | None:
    from hvdllm import config as config_mod
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine

    cfg = config_mod.validate(model_config(args.model, args.grad_clip, args.seed), rt.size)
    wanted = [v for v in (args.variants.split(",") if args.variants else VARIANTS[args.backend]) if v]
    unknown = [v for v in wanted if v not in VARIANTS[args.backend]]
    if unknown:
        raise ValueError(f"--variants: {unknown} not available for {args.backend} "
                         f"(choose from {', '.join(VARIANTS[args.backend])})")
    if rt.size > 1 and not args.no_solo:
        wanted.append("solo")
    ranks = common.Ranks(rt.comm)
    batches = common.random_batches(cfg, np.random.default_rng([args.seed, rt.rank]))
    t0 = time.perf_counter()
    engine = build_engine(cfg, Layout.from_config(cfg, rt.size, rt.rank), rt, backend) \
        if "hvdllm" in wanted else None
    build = torch_variants if args.backend == "torch" else tf_variants
    fns, weights, closers = build(cfg, rt, engine, batches, wanted, args.ddp_port)
    fns = {v: fns.get(v) for v in wanted}  # solo: None but on rank 0
    setup_s = time.perf_counter() - t0
    tag = f"[bench dp] {args.backend} np={rt.size} {args.model}"
    if rt.rank == 0:
        common.say(tag + ":", f"variants {', '.join(fns)}; {args.warmup} warm-up + {args.steps} timed "
                              f"steps each, interleaved {args.per_round} at a time")
    load0 = os.getloadavg()
    early = {}

    def compare_early():
        early.update(weight_agreement({v: weights[v]() for v in fns if v in weights}))
    times, foreign = ranks.measured(lambda: common.interleaved(
        fns, args.steps, args.warmup, args.per_round, before=ranks.barrier, solo=["solo"],
        idle=ranks.idle, after_warmup=compare_early, progress=tag + ":" if rt.rank == 0 else None))
    all_times = ranks.gather(times)  # one dict per rank
    agreement = weight_agreement({v: weights[v]() for v in fns if v in weights})
    for close in closers:
        close()
    if rt.rank != 0:
        return None
    m = cfg.model
    tokens = rt.size * cfg.train.batch_size * m.block_size
    variants = {}
    for v in fns:
        s = common.step_stats([t[v] for t in all_times] if v != "solo" else [all_times[0][v]])
        tok = tokens // rt.size if v == "solo" else tokens
        s.update({"rank0_median_s": s["rank_medians_s"][0], "tokens_per_step": tok,
                  "tokens_per_s": tok / s["median_s"]})
        variants[v] = s
    return {
        "backend": args.backend, "np": rt.size, "launcher": rt.launcher, "model": args.model,
        "model_config": common.model_shape(m),
        "params": param_count(args.model), "batch_per_rank": cfg.train.batch_size,
        "tokens_per_step": tokens, "threads_per_rank": args.threads, "grad_clip": args.grad_clip,
        "lr": LR, "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round,
        "rounds": len(common.rounds_for(args.steps, args.per_round)), "setup_s": setup_s,
        "variants": variants, "weights_rel_diff_after_warmup": early,
        "weights_rel_diff_vs_first": agreement,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "foreign_cpu_cores": foreign,
        **common.run_info(),
    }


def main(argv=None) -> int:
    args = parse(argv)
    return common.worker_main(args, lambda rt, backend: run(args, rt, backend),
                              what="bench dp (its barriers and gathers)")


if __name__ == "__main__":
    sys.exit(main())
