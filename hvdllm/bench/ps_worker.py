"""The MPI side of `hvdllm bench ps` (launched by hvdllm/bench/ps.py, not a user command).

    mpirun -np W+S python -m hvdllm.bench.ps_worker throughput --out F.json [options]
    mpirun -np 2   python -m hvdllm.bench.ps_worker roles --out F.json [options]

throughput: one job runs every mode in turn, --rounds times, in a rotating order (sync without a
straggler, sync, async, ssp; worker 1 slowed by --factor in the last three), so that other load on
the machine falls on every mode alike. A phase is a fresh set of ParameterServer / PSWorker objects
(the real ones of hvdllm/strategies) with a budget of --steps x W pushes, started by a barrier and
timed on trainer rank 0 until FINAL, when every push is applied: tokens/s = budget tokens / time.

roles: trainer rank 0 trains alone, with rank 1 an evaluator (strategies/roles.py, at its
roles.nice priority). Phases alternate --rounds times: "off" (no snapshot offered, the evaluator
sits idle waiting) and "on" (a snapshot offered every --snapshot-every steps); each step's time
is recorded, the first --settle steps of a phase dropped (the evaluator may still be finishing).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

from hvdllm import config, data
from hvdllm import lr as lr_schedule
from hvdllm.bench import common
from hvdllm.bench.ps import MODELS, model_sets
from hvdllm.cli import process_set_groups
from hvdllm.layout import Layout
from hvdllm.parallelize import build_engine
from hvdllm.strategies import param_server, ps_worker, roles


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m hvdllm.bench.ps_worker")
    p.add_argument("what", choices=["throughput", "roles"])
    p.add_argument("--model", default="small", choices=list(MODELS))
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=15, help="budget of a phase: steps x W pushes / trainer steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--snapshot-every", type=int, default=5)
    p.add_argument("--settle", type=int, default=3)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def job_config(args):
    """The config of this job: the bench's model, and the servers or the evaluator it measures."""
    extra = [f"ps.servers={args.servers}"] if args.what == "throughput" else \
        ["roles.evaluators=1", f"roles.snapshot_every={args.snapshot_every}"]
    cfg = config.load(None, model_sets(args) + extra)
    config.validate(cfg, None)
    return cfg


def setup(cfg, rt):
    tokens = data.prepare(cfg.data, rt.rank, timeout_s=cfg.train.step_timeout)
    cfg.model.vocab_size = tokens.tokenizer.vocab_size
    return tokens, Layout.from_config(cfg, rt.size, rt.rank)


def barrier(rt):
    """Ranks wait for a phase's start asleep: a server or an idle rank must not spin on the cores
    the timed ranks compute on."""
    common.Ranks(rt.comm).idle("a bench phase")


# -- throughput ---------------------------------------------------------------------------------
def phases(args):
    slow = {"straggler_rank": 1, "straggler_factor": args.factor}
    return [("sync, no straggler", {"mode": "sync"}), ("sync", {"mode": "sync", **slow}),
            ("async", {"mode": "async", **slow}),
            (f"ssp tau={args.staleness}", {"mode": "ssp", "staleness": args.staleness, **slow})]


def run_phase(cfg, ps_cfg: dict, steps: int, engine, sampler, rt, layout, out_dir, start: int):
    """One budget of pushes under `ps_cfg`; (seconds to FINAL on this rank, local steps, next data step)."""
    pc = copy.deepcopy(cfg)
    pc.train.steps, pc.train.out_dir = steps, out_dir
    for k, v in ps_cfg.items():
        setattr(pc.ps, k, v)
    barrier(rt)
    t0 = time.perf_counter()
    if layout.role() == "server":
        param_server.ParameterServer(pc, layout, rt.comm).run()
        return time.perf_counter() - t0, 0, start
    w = ps_worker.PSWorker(engine, pc, layout, rt)
    k = 0
    while True:
        x, y = sampler.batch(start + k)
        res = w.train_step(x, y, lr_schedule.lr_at(k, pc.optim, steps))
        k += 1
        if res.final:
            break
    dt = time.perf_counter() - t0
    w.close()
    return dt, k, start + k


def throughput(args, cfg, rt, backend) -> dict | None:
    tokens, layout = setup(cfg, rt)
    engine = sampler = None
    if layout.role() == "trainer":
        backend.configure(1, cfg.train.seed)
        engine = build_engine(cfg, layout, rt, backend, wrap_ps=False)  # each phase wraps its own PSWorker
        sampler = data.Sampler(tokens.train, cfg.model.block_size, cfg.train.batch_size, layout.dp,
                               layout.dp_rank, cfg.train.seed)
    out_dir = tempfile.mkdtemp(prefix="hvdllm-bench-ps-") if rt.rank == 0 else ""
    out_dir = rt.comm.bcast(out_dir, root=0)
    plan, results, start = phases(args), [], 0
    run_phase(cfg, {"mode": "sync"}, 3, engine, sampler, rt, layout, out_dir, 0)   # warm-up
    for r in range(args.rounds):
        for i in range(len(plan)):
            name, ps_cfg = plan[(i + r) % len(plan)]     # rotate: no mode always runs first
            dt, k, start = run_phase(cfg, ps_cfg, args.steps, engine, sampler, rt, layout, out_dir, start)
            results.append({"mode": name, "round": r, "seconds": dt, "local_steps": k})
    gathered = rt.comm.gather(results, root=0)
    if rt.rank != 0:
        return None
    W = layout.n_trainers
    tokens_per_push = cfg.train.batch_size * cfg.model.block_size
    return {"rank0": gathered[0], "local_steps": {r: [x["local_steps"] for x in g] for r, g in enumerate(gathered)
                                                   if r < W},
            "tokens_per_phase": args.steps * W * tokens_per_push, "workers": W, "servers": args.servers}


# -- roles ------------------------------------------------------------------------------------
def roles_bench(args, cfg, rt, backend) -> dict | None:
    tokens, layout = setup(cfg, rt)
    if layout.role() == "evaluator":
        engine = roles.role_engine(cfg, rt, backend)
        barrier(rt)   # measure with the evaluator up (its start-up would otherwise overlap)
        roles.Evaluator(cfg, layout, rt.comm, engine, tokens).run()
        return None
    backend.configure(1, cfg.train.seed)
    engine = build_engine(cfg, layout, rt, backend)
    barrier(rt)
    sampler = data.Sampler(tokens.train, cfg.model.block_size, cfg.train.batch_size, 1, 0, cfg.train.seed)
    records = []
    pub = roles.SnapshotPublisher(cfg, layout, rt, records.append)
    times = {"off": [], "on": []}
    step, total = 0, 2 * args.rounds * args.steps
    for r in range(args.rounds):
        for phase in (("off", "on") if r % 2 == 0 else ("on", "off")):
            for k in range(args.steps):
                x, y = sampler.batch(step)
                t0 = time.perf_counter()
                engine.train_step(x, y, lr_schedule.lr_at(step, cfg.optim, total))
                if phase == "on":
                    pub.after_step(step + 1, engine)
                dt = time.perf_counter() - t0
                step += 1
                if k >= args.settle:
                    times[phase].append(dt)
    pub.close(engine)
    ev = [x for x in records if x.get("role") == "evaluator"]
    return {"step_times_s": times, "evaluations": len(ev),
            "eval_time_s": sorted(x["eval_time_s"] for x in ev)[len(ev) // 2] if ev else None,
            "publisher": records[-1]}


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = job_config(args)
    what = throughput if args.what == "throughput" else roles_bench
    return common.worker_main(args, lambda rt, backend: what(args, cfg, rt, backend), what="hvdllm bench ps",
                              agg_cfg=cfg.aggregation, groups=lambda: process_set_groups(cfg))


if __name__ == "__main__":
    sys.exit(main())
