"""One process of `hvdllm bench compute`, started by hvdllm/bench/compute.py under mpirun -np 1.

For each setting (fp32, bf16, fp32 + full activation checkpointing, fp32 + compile, bf16 +
compile) two loops train the same GPT (same config, seed, batches, AdamW settings, gradient
clip) in this process:
- hvdllm: the engine `hvdllm train` builds (hvdllm/parallelize.py), engine.train_step;
- plain: a hand-written loop over the backend's model module, nothing of hvdllm's step code:
  torch: GPT.loss, backward, clip_grad_norm_, torch.optim.AdamW (built as the engine builds it);
  TF: one tf.function (jit_compile under compile: there is no Horovod op to keep out of XLA)
  of GradientTape, clip_by_global_norm and the backend's AdamW.
The two are timed interleaved (common.interleaved: one step of each in turn), so a load change
on the shared machine hits both; `paired` is the median of the per-round ratios. Under
checkpointing a third engine, the same without it, runs in the same rounds: `vs_keep_paired`
is checkpointing's step-time cost, paired the same way.

Memory: after the timing, one more step of each loop; `act_mib` = the memory the step adds at
its peak over what was held just before it (activations, gradients and temporaries), `peak_mib`
that peak. torch: the resident anonymous memory, sampled every 5 ms (hf_worker.AnonPeak; glibc
returns freed large blocks to the system at once, MALLOC_MMAP_THRESHOLD_ set by the driver, so
memory an earlier step freed is not counted as held; a step must last well over 5 ms for the
sampling to see its peak). TensorFlow keeps freed memory in its own pool, so RSS cannot show
it: its CPU allocator's counters (tf.config.experimental.get_memory_info, with the BFC
allocator on CPU, TF_CPU_ALLOCATOR_USE_BFC set by the driver), reset before the step.
"""
from __future__ import annotations

import statistics

import numpy as np

from hvdllm.bench import common
from hvdllm.bench.hf_worker import MIB, AnonPeak, rss_anon

SETTINGS = {   # name: (train.precision, train.activation_checkpointing, train.compile)
    "fp32": ("fp32", "none", False),
    "bf16": ("bf16", "none", False),
    "fp32+ckpt": ("fp32", "full", False),
    "fp32+compile": ("fp32", "none", True),
    "bf16+compile": ("bf16", "none", True),
}
LR = 1e-3


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.compute_worker", __doc__, steps=8, warmup=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    return p.parse_args(argv)


def make_cfg(args, setting: str, keep: bool = False):
    """The setting's config; `keep`: the same without activation checkpointing."""
    from hvdllm import config
    precision, ckpt, compiled = SETTINGS[setting]
    ckpt = "none" if keep else ckpt
    cfg = common.gpt_config((args.layers, args.width, args.heads, args.seq, 256, args.batch), args.seed, args.threads)
    cfg.backend = args.backend
    cfg.train.precision, cfg.train.activation_checkpointing, cfg.train.compile = precision, ckpt, compiled
    return config.resolve(config.validate(cfg, 1), 1, 256)


def plain_torch(cfg):
    import torch

    from torch_backend import adamw_state
    from torch_backend.model import GPT
    model = GPT(cfg.model, cfg.train.seed)
    model.configure(cfg.train)
    model.train()
    opt = adamw_state.make_adamw(model.named(), cfg.optim)
    params = [p for _, p in model.named()]

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
        opt.step()
        return float(loss.detach())
    return step


def plain_tf(cfg):
    import tensorflow as tf

    from tf_backend.model import GPT
    from tf_backend.optim import AdamW
    model = GPT(cfg.model, cfg.train.seed)
    model.configure(cfg.train)
    variables = list(model.params.values())
    opt = AdamW(variables, cfg.optim)

    @tf.function(jit_compile=cfg.train.compile, autograph=False, reduce_retracing=True)
    def step_fn(x, y, lr):
        with tf.GradientTape() as tape:
            loss = model.loss(x, y, training=True)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        grads, _ = tf.clip_by_global_norm(grads, cfg.optim.grad_clip)
        opt.apply(grads, lr)
        return loss

    lr = tf.constant(LR, tf.float64)
    return lambda x, y: float(step_fn(tf.constant(x), tf.constant(y), lr))


def memory(fn, backend_name: str) -> dict:
    if backend_name == "tensorflow":   # TF's own allocator counts (its pool never shrinks RSS)
        import tensorflow as tf
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        fn()
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        return {"act_mib": (peak - before) / MIB, "peak_mib": peak / MIB}
    before = rss_anon()
    with AnonPeak() as anon:
        fn()
    return {"act_mib": (anon.peak - before) / MIB, "peak_mib": anon.peak / MIB}


def run_setting(args, rt, backend, setting: str) -> list[dict]:
    from hvdllm import mfu, params
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    cfg = make_cfg(args, setting)
    engine = build_engine(cfg, Layout.from_config(cfg, 1, 0), rt, backend)
    plain = (plain_torch if args.backend == "torch" else plain_tf)(cfg)
    nxt = common.cycle(common.random_batches(cfg, np.random.default_rng(args.seed)))
    fns = {"hvdllm": lambda: engine.train_step(*nxt(), LR), "plain": lambda: plain(*nxt())}
    timed = dict(fns)
    if cfg.train.activation_checkpointing != "none":   # its cost paired with the same step keeping all
        keep = make_cfg(args, setting, keep=True)
        eager = build_engine(keep, Layout.from_config(keep, 1, 0), rt, backend)
        timed["keep"] = lambda: eager.train_step(*nxt(), LR)
    times = common.interleaved(timed, args.steps, args.warmup, args.per_round)
    tokens = cfg.train.batch_size * cfg.model.block_size
    flops = mfu.flops_per_step(cfg.model, tokens)
    peak = backend.matmul_flops(cfg.train.precision)
    ratio = [a / b for a, b in zip(times["hvdllm"], times["plain"])]
    rows = []
    for loop, fn in fns.items():
        s = common.summarize(times[loop])
        rows.append({"setting": setting, "loop": loop, "params": params.count(cfg.model), **s,
                     "tokens_per_s": tokens / s["median_s"],
                     "mfu": mfu.utilisation(flops, s["median_s"], peak, 1), **memory(fn, args.backend)})
    rows[0]["vs_plain"] = rows[0]["median_s"] / rows[1]["median_s"]
    rows[0]["paired"] = statistics.median(ratio)
    if "keep" in times:
        rows[0]["vs_keep_paired"] = statistics.median(a / b for a, b in zip(times["hvdllm"], times["keep"]))
    return rows


def run(args, rt, backend) -> dict:
    rows = []
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        common.say("[bench compute]", f"{args.backend} {setting}")
        rows += run_setting(args, rt, backend, setting)
    return {"backend": args.backend, "rows": rows, "shape": {"layers": args.layers, "width": args.width,
            "heads": args.heads, "seq": args.seq, "batch": args.batch, "threads": args.threads},
            **common.run_info()}


def main(argv=None) -> int:
    args = parse(argv)
    bad = [s for s in args.settings.split(",") if s.strip() and s.strip() not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: {bad} not among {', '.join(SETTINGS)}")
    return common.worker_main(args, lambda rt, be: run(args, rt, be), what="hvdllm bench compute")


if __name__ == "__main__":
    raise SystemExit(main())
