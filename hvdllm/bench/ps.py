"""`hvdllm bench ps`: parameter servers with a straggler, and the cost of an attached evaluator.

    hvdllm bench ps [--workers 2] [--servers 1] [--model small|tiny|medium] [--factor 2]
                    [--staleness 2] [--phase-steps 40] [--rounds 3] [--steps 60]
                    [--backend torch] [--out runs/bench/ps.json]

Three launches, each printed before it runs (one compute thread per rank):

1. Throughput, `mpirun -np W+S python -m hvdllm.bench.ps_worker throughput`: one job runs every
   mode --rounds times in a rotating order, each phase a budget of --phase-steps x W pushes on
   fresh servers and workers (the real classes): sync without a straggler, then with worker 1
   slowed by --factor (ps.straggler_factor: it computes each gradient factor times, so its core
   stays busy as a slower machine's would, whatever else loads the host; every rank is
   pinned to a core, so no rank runs on a core another left idle) sync, async and ssp. Interleaving matters on a
   shared machine: other jobs' load then falls on every mode alike. tokens/s = the phase's
   tokens / its time from a barrier to FINAL on trainer rank 0; the median over rounds. "vs sync"
   is the median over rounds of the ratio to sync's phase in the same round (paired, so drift
   cancels), and "of bound" that ratio over the bound below. Phases are long (40 steps) because a
   phase ends only when the straggler's last step is in: up to f compute times of tail.
2. Loss at equal tokens, `mpirun -np W+S python -m hvdllm train` for sync, async and ssp with the
   straggler: the trainers' final val_loss after the same budget (--steps x W pushes of batch
   rows), and the servers' logged maximum gap and staleness.
3. Evaluator cost, `mpirun -np 2 python -m hvdllm.bench.ps_worker roles`: one trainer whose steps
   alternate between phases with and without snapshots offered to an evaluator rank (running at
   roles.nice); median step time with / without.

With W workers of which one is f times slower, async can reach (W - 1 + 1/f) / (W / f) of sync's
throughput when compute dominates: 1.5 at W = 2, f = 2 (the goal sits at that bound); more when
sync also waits on the servers' update, which async overlaps with the other workers' compute.

Goals: async / sync >= 1.5 with the straggler, |val_loss(async) / val_loss(sync) - 1| <= 5%,
trainer step with an evaluator / without <= 1.05. A benchmark, not a test: nothing fails on a
slow result. It prints the tables and the goals, and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdllm import metrics
from hvdllm.bench import common
from hvdllm.runtime import cores

TAG = "[bench ps]"
GOALS = {"async/sync": 1.5, "loss_gap": 0.05, "evaluator_step_ratio": 1.05}
MODELS = {  # n_layer, n_embd, n_head, block_size, batch per worker
    "tiny": (2, 32, 2, 32, 4),
    "small": (4, 128, 4, 64, 8),
    "medium": (6, 192, 6, 128, 8),
}


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench ps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="trainer ranks (default 2)")
    p.add_argument("--servers", type=int, default=1, help="parameter-server ranks (default 1)")
    p.add_argument("--model", default="small", choices=list(MODELS))
    p.add_argument("--factor", type=float, default=2.0, help="the straggler's slowdown (default 2)")
    p.add_argument("--staleness", type=int, default=2, help="ssp's bound tau (default 2)")
    p.add_argument("--phase-steps", type=int, default=40, help="throughput: budget per phase, x W pushes")
    p.add_argument("--rounds", type=int, default=3, help="throughput and evaluator: rounds of phases")
    p.add_argument("--steps", type=int, default=60, help="loss runs: train.steps (budget steps x W pushes)")
    p.add_argument("--loss-repeats", type=int, default=3, help="loss runs: launches of async and of ssp (mean)")
    p.add_argument("--roles-steps", type=int, default=60, help="evaluator: trainer steps per phase")
    p.add_argument("--snapshot-every", type=int, default=5, help="evaluator: roles.snapshot_every")
    p.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,loss,roles")
    common.add_output_options(p, "ps", timeout=900, plot=False)
    a = p.parse_args(argv)
    if a.workers < 2 or a.servers < 1 or min(a.steps, a.phase_steps, a.roles_steps) < 4 or a.factor < 1:
        p.error("need --workers >= 2, --servers >= 1, steps >= 4 and --factor >= 1")
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


def model_sets(args) -> list[str]:
    """The --set overrides every launch shares (bench ps_worker builds its config from them too)."""
    L, C, H, T, b = MODELS[args.model]
    return [f"backend={args.backend}", f"model.n_layer={L}", f"model.n_embd={C}", f"model.n_head={H}",
            f"model.block_size={T}", f"train.batch_size={b}", "data.max_bytes=400000",
            "train.threads=1", "train.progress=false", "train.eval_every=0", "train.checkpoint_every=0",
            "train.eval_batches=4", "train.sample_tokens=0", "optim.lr=2e-3", "optim.warmup_steps=5"]


def launch(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run one job (its output to log_path); exit code, wall time and other jobs' CPU load."""
    common.check_available(cmd)
    common.say(TAG, " ".join(cmd))
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, t0 = common.cpu_snapshot(), time.monotonic()
    rc, tail = common.launch(cmd, timeout, TAG, log=log_path)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    if rc != 0:
        common.say(TAG, f"exit {rc}:\n{tail[-2000:]}")
    return {"command": cmd, "rc": rc, "wall_s": time.monotonic() - t0,
            "foreign_cpu_cores": common.foreign_cores(cpu0, common.cpu_snapshot(), own)}


def worker_command(args, what: str, out: Path) -> list[str]:
    return common.worker_command("hvdllm.bench.ps_worker", args.workers + args.servers if what == "throughput" else 2, [
        what, "--model", args.model, "--backend", args.backend, "--rounds", args.rounds, "--factor", args.factor,
        "--staleness", args.staleness, "--servers", args.servers, "--snapshot-every", args.snapshot_every,
        "--steps", args.phase_steps if what == "throughput" else args.roles_steps, "--out", out], pin=True)


def cores_per_process(n: int) -> str:
    return f"{n} processes, each pinned to one of {cores()} cores: {min(1.0, cores() / n):.2f} cores per process"


# -- the three parts --------------------------------------------------------------------------
def run_throughput(args, tmp: Path) -> tuple[dict, list[dict]]:
    job = launch(worker_command(args, "throughput", tmp / "tp.json"), tmp / "throughput.log", args.timeout)
    if job["rc"] != 0:
        return job, []
    raw = json.loads((tmp / "tp.json").read_text())
    job["raw"] = raw
    rows = []
    for mode in dict.fromkeys(x["mode"] for x in raw["rank0"]):
        secs = [x["seconds"] for x in raw["rank0"] if x["mode"] == mode]
        idx = [i for i, x in enumerate(raw["rank0"]) if x["mode"] == mode]
        steps = {int(w): [s[i] for i in idx] for w, s in raw["local_steps"].items()}
        rows.append({"mode": mode, "tokens_per_s": raw["tokens_per_phase"] / float(np.median(secs)),
                     "tokens_per_s_runs": [raw["tokens_per_phase"] / s for s in secs],
                     "steps_per_worker": [int(np.median(v)) for _, v in sorted(steps.items())]})
    by_mode = {r["mode"]: r for r in rows}
    sync = by_mode["sync"]
    bound = async_bound(args.workers, args.factor)
    for r in rows:   # paired: phase i of this mode against sync's phase i (same round)
        r["speedup_vs_sync"] = float(np.median([a / s for a, s in zip(r["tokens_per_s_runs"],
                                                                       sync["tokens_per_s_runs"])]))
        if r["mode"] not in ("sync", "sync, no straggler"):
            r["of_bound"] = r["speedup_vs_sync"] / bound
    return job, rows


def async_bound(workers: int, factor: float) -> float:
    """async/sync throughput when compute dominates and one of W workers is f times slower."""
    return (workers - 1 + 1 / factor) / (workers / factor)


def run_losses(args, tmp: Path) -> tuple[list[dict], list[dict]]:
    """sync once (it is deterministic: it equals data parallelism); async and ssp --loss-repeats
    times each, since which push lands when depends on timing: their mean, and each run."""
    slow = ["ps.straggler_rank=1", f"ps.straggler_factor={args.factor}"]
    jobs, rows = [], []
    for mode, extra in (("sync", []), ("async", []), (f"ssp tau={args.staleness}", [f"ps.staleness={args.staleness}"])):
        runs = []
        for rep in range(1 if mode == "sync" else args.loss_repeats):
            out = tmp / f"loss_{mode.split()[0]}_{rep}"
            sets = model_sets(args) + [f"train.steps={args.steps}", f"ps.servers={args.servers}",
                                       f"ps.mode={mode.split()[0]}", f"train.out_dir={out}"] + slow + extra
            out.mkdir(parents=True)
            job = launch(common.worker_command("hvdllm", args.workers + args.servers,
                                               ["train"] + [a for kv in sets for a in ("--set", kv)], pin=True),
                         out / "job.log", args.timeout)
            jobs.append(job)
            if job["rc"] == 0:
                val = [r["val_loss"] for r in metrics.read(out / "metrics.jsonl")
                       if "val_loss" in r and "role" not in r]
                runs.append((val[-1], metrics.read(out / "ps_server0.jsonl")))
        if not runs:
            continue
        logs = [x for _, log in runs for x in log]
        rows.append({"mode": mode, "val_loss": float(np.mean([v for v, _ in runs])),
                     "val_loss_runs": [round(v, 4) for v, _ in runs],
                     "max_gap": max(x["gap"] for x in logs), "max_staleness": max(x["staleness"] for x in logs),
                     "pushes_per_worker": [sum(x["worker"] == w for x in runs[0][1]) for w in range(args.workers)]})
    sync = next((r for r in rows if r["mode"] == "sync"), None)
    for r in rows:
        if sync:
            r["loss_vs_sync"] = r["val_loss"] / sync["val_loss"] - 1
    return jobs, rows


def run_roles(args, tmp: Path) -> tuple[dict, list[dict]]:
    job = launch(worker_command(args, "roles", tmp / "roles.json"), tmp / "roles.log", args.timeout)
    if job["rc"] != 0:
        return job, []
    raw = json.loads((tmp / "roles.json").read_text())
    job["raw"] = {k: v for k, v in raw.items() if k != "step_times_s"}
    rows = [{"trainer": "alone (evaluator idle)", **common.summarize(raw["step_times_s"]["off"])},
            {"trainer": "with evaluator", **common.summarize(raw["step_times_s"]["on"]),
             "evaluations": raw["evaluations"], "eval_time_s": raw["eval_time_s"],
             "snapshots_skipped": raw["publisher"]["snapshots_skipped"],
             "offer_ms_max": 1e3 * raw["publisher"]["offer_s_max"]}]
    rows[1]["ratio"] = rows[1]["median_s"] / rows[0]["median_s"]
    return job, rows


def goals(tp, losses, role_rows) -> list[dict]:
    g = []
    a = next((r for r in tp if r["mode"] == "async"), None)
    if a:
        g.append({"goal": "async/sync throughput (straggler)", "target": ">= 1.5", "value": a["speedup_vs_sync"],
                  "met": a["speedup_vs_sync"] >= GOALS["async/sync"]})
    la = next((r for r in losses if r["mode"] == "async" and "loss_vs_sync" in r), None)
    if la:
        g.append({"goal": "async val_loss vs sync, equal tokens", "target": "within 5%",
                  "value": la["loss_vs_sync"], "met": abs(la["loss_vs_sync"]) <= GOALS["loss_gap"]})
    if role_rows:
        r = role_rows[1]["ratio"]
        g.append({"goal": "trainer step with evaluator / without", "target": "<= 1.05", "value": r,
                  "met": r <= GOALS["evaluator_step_ratio"]})
    return g


def main(argv=None) -> int:
    args = parse(argv or [])
    L, C, H, T, b = MODELS[args.model]
    tmp = Path(tempfile.mkdtemp(prefix="hvdllm-bench-ps-"))
    res = {"benchmark": "ps", "model": args.model, "model_shape": {"n_layer": L, "n_embd": C, "n_head": H,
           "block_size": T, "batch_per_worker": b}, "workers": args.workers, "servers": args.servers,
           "straggler_factor": args.factor, "staleness": args.staleness, "backend": args.backend,
           "cores": cores(), "loadavg_start": os.getloadavg(), "jobs": []}
    tp = losses = role_rows = []
    try:
        if "throughput" not in args.skip:
            job, tp = run_throughput(args, tmp)
            res["jobs"].append(job)
        if "loss" not in args.skip:
            jobs, losses = run_losses(args, tmp)
            res["jobs"] += jobs
        if "roles" not in args.skip:
            job, role_rows = run_roles(args, tmp)
            res["jobs"].append(job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(throughput=tp, losses=losses, roles=role_rows, goals=goals(tp, losses, role_rows),
               loadavg_end=os.getloadavg(), failed=[" ".join(j["command"]) for j in res["jobs"] if j["rc"]])
    slow = f"worker 1 slowed {args.factor}x"
    if tp:
        print(f"\nthroughput: {args.workers} workers ({args.model}: batch {b} x {T} tokens), {args.servers} "
              f"server(s); {args.rounds} rounds of {args.phase_steps} x {args.workers} pushes per mode; {slow} "
              f"except in the first row; {cores_per_process(args.workers + args.servers)}")
        # a speed-up over sync cannot exceed the worker count
        common.print_table(tp, [("mode", "mode"), ("tokens_per_s", "tokens/s"), ("speedup_vs_sync", "vs sync"),
                                ("of_bound", "of bound"), ("steps_per_worker", "steps per worker")],
                           {"speedup_vs_sync": args.workers})
        print(f"bound for async/sync with {args.workers} workers, one {args.factor}x slower: "
              f"{async_bound(args.workers, args.factor):.3f}")
    if losses:
        print(f"\nloss at equal tokens: {args.steps} x {args.workers} pushes, {slow}; async and ssp: "
              f"mean of {args.loss_repeats} launches (pushes per worker: the first); "
              f"{cores_per_process(args.workers + args.servers)}")
        common.print_table(losses, [("mode", "mode"), ("val_loss", "val_loss"), ("loss_vs_sync", "vs sync"),
                                    ("val_loss_runs", "runs"), ("max_gap", "max gap"),
                                    ("max_staleness", "max staleness"),
                                    ("pushes_per_worker", "pushes per worker")])
    if role_rows:
        print(f"\ntrainer step time, one trainer; evaluator offered a snapshot every {args.snapshot_every} steps; "
              f"{cores_per_process(2)}")
        common.print_table(role_rows, [("trainer", "trainer"), ("median_s", "median step s"), ("p25_s", "p25"),
                                       ("p75_s", "p75"), ("n", "steps"), ("ratio", "ratio"),
                                       ("evaluations", "evals"), ("snapshots_skipped", "skipped"),
                                       ("offer_ms_max", "max offer ms")])
    others = [j["foreign_cpu_cores"] for j in res["jobs"] if j.get("foreign_cpu_cores") is not None]
    if others:
        print(f"\nother jobs kept {np.median(others):.2f} of {cores()} cores busy (median over launches)")
    if res["goals"]:
        print("\ngoals")
        common.print_table(res["goals"], ["goal", "target", "value", "met"],
                           {"value": lambda g: args.workers if g["goal"].startswith("async/sync") else None})
    path = common.write_json(args.out, res)
    print(f"\n{TAG} wrote {path}")
    return 0 if not res["failed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
