"""`hvdllm bench ps`: parameter servers with a straggler, and the cost of an attached evaluator.

    hvdllm bench ps [--workers 2] [--servers 1] [--steps 40] [--model small|tiny]
                    [--factor 2] [--staleness 2] [--repeats 1] [--roles-repeats 2]
                    [--backend torch] [--out runs/bench/ps.json]

Parameter servers: one `mpirun -np W+S ... hvdllm train` per configuration, the same model, data,
seed and budget (train.steps x W pushes of W x batch rows... i.e. the same tokens), one compute
thread per rank:

    sync (no straggler)   the reference pace
    sync / async / ssp    worker 1 slowed by --factor (ps.straggler_factor: it sleeps
                          (factor - 1) x its compute time each step: a slower machine, not a busier one)

Throughput is measured on the servers (their logs, ps_server0.jsonl): tokens of the pushes applied
after the first 2 x W, over the time they took, so start-up and warm-up are left out. Loss at equal
tokens: the trainers' final validation loss, after the same budget of pushes in every mode.
With W workers of which one is f times slower, async can reach (W - 1 + 1/f) / (W / f) of sync's
throughput when compute dominates: 1.5 at W = 2, f = 2.

Task separation: one trainer alone, then the same trainer with an evaluator rank offered a
snapshot every --snapshot-every steps (launched alternately --roles-repeats times; the trainer's
step times pooled, from the evaluator's first snapshot on).

Goals: async / sync >= 1.5 with the straggler, |val_loss(async) / val_loss(sync) - 1| <= 5%,
trainer step with an evaluator / without <= 1.05. A benchmark, not a test: nothing fails on a
slow result. It prints each command, the tables and the goals, and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdllm import metrics
from hvdllm.bench import common

ROOT = Path(__file__).resolve().parents[2]
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
    p.add_argument("--steps", type=int, default=40, help="train.steps: the budget is steps x workers pushes")
    p.add_argument("--model", default="small", choices=list(MODELS))
    p.add_argument("--factor", type=float, default=2.0, help="the straggler's slowdown (default 2)")
    p.add_argument("--staleness", type=int, default=2, help="ssp's bound tau (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="launches per PS configuration")
    p.add_argument("--roles-repeats", type=int, default=2, help="alternating launches alone / with evaluator")
    p.add_argument("--roles-steps", type=int, default=60, help="trainer steps of the evaluator runs")
    p.add_argument("--snapshot-every", type=int, default=5, help="roles.snapshot_every of the evaluator runs")
    p.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    p.add_argument("--no-roles", action="store_true", help="skip the evaluator runs")
    p.add_argument("--no-ps", action="store_true", help="skip the parameter-server runs")
    p.add_argument("--timeout", type=float, default=900, help="seconds one mpirun may take")
    p.add_argument("--keep", action="store_true", help="keep the runs' out_dirs (printed)")
    p.add_argument("--out", default="runs/bench/ps.json")
    a = p.parse_args(argv)
    if a.workers < 2 or a.servers < 1 or a.steps < 4 or a.factor < 1 or a.repeats < 1:
        p.error("need --workers >= 2, --servers >= 1, --steps >= 4, --factor >= 1, --repeats >= 1")
    return a


def _env() -> dict:
    e = dict(os.environ)
    pp = e.get("PYTHONPATH", "")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers / CI run as root
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return e


def model_sets(args) -> list[str]:
    L, C, H, T, b = MODELS[args.model]
    return [f"backend={args.backend}", f"model.n_layer={L}", f"model.n_embd={C}", f"model.n_head={H}",
            f"model.block_size={T}", f"train.batch_size={b}", "data.max_bytes=400000",
            "train.threads=1", "train.progress=false", "train.eval_every=0", "train.checkpoint_every=0",
            "train.eval_batches=4", "train.sample_tokens=0", "optim.lr=2e-3", "optim.warmup_steps=5"]


def command(np_: int, sets: list[str]) -> list[str]:
    cmd = ["mpirun", "-np", str(np_), "--bind-to", "none", "-x", "OMPI_MCA_mpi_yield_when_idle=1",
           "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL"]
    if np_ > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    return cmd + [sys.executable, "-m", "hvdllm", "train"] + [a for kv in sets for a in ("--set", kv)]


def launch(cmd: list[str], out: Path, timeout: float) -> dict:
    """Run one job (output to out/job.log); its wall time, exit code and the machine's load."""
    print("[bench ps] " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, t0 = common.cpu_snapshot(), time.monotonic()
    with open(out / "job.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    if rc != 0:
        print(f"[bench ps] exit {rc}; see {out / 'job.log'}:\n" + (out / "job.log").read_text()[-2000:],
              file=sys.stderr, flush=True)
    return {"rc": rc, "wall_s": time.monotonic() - t0,
            "foreign_cpu_cores": common.foreign_cores(cpu0, common.cpu_snapshot(), own)}


# -- parameter servers ------------------------------------------------------------------------
def ps_configs(args) -> list[tuple[str, list[str]]]:
    slow = ["ps.straggler_rank=1", f"ps.straggler_factor={args.factor}"]
    return [("sync, no straggler", ["ps.mode=sync"]), ("sync", ["ps.mode=sync"] + slow),
            ("async", ["ps.mode=async"] + slow),
            (f"ssp tau={args.staleness}", ["ps.mode=ssp", f"ps.staleness={args.staleness}"] + slow)]


def ps_result(out: Path, args, tokens_per_push: int) -> dict:
    log = metrics.read(out / "ps_server0.jsonl")
    applied = [x for x in log if x["applied"]]
    skip = 2 * args.workers                         # start-up and warm-up: the first 2 global steps
    t_start, t_end = applied[skip - 1]["time"], applied[-1]["time"]
    val = [r["val_loss"] for r in metrics.read(out / "metrics.jsonl") if "val_loss" in r and "role" not in r]
    return {"tokens_per_s": (len(applied) - skip) * tokens_per_push / max(t_end - t_start, 1e-9),
            "val_loss": val[-1] if val else None, "pushes_applied": len(applied),
            "pushes_per_worker": [sum(x["worker"] == w for x in log) for w in range(args.workers)],
            "max_gap": max(x["gap"] for x in log), "max_staleness": max(x["staleness"] for x in log),
            "train_s": t_end}


def run_ps(args, tmp: Path) -> list[dict]:
    L, C, H, T, b = MODELS[args.model]
    rows = []
    for rep in range(args.repeats):
        for name, sets in ps_configs(args):
            out = tmp / f"ps_{len(rows)}"
            job = launch(command(args.workers + args.servers,
                                 model_sets(args) + [f"train.steps={args.steps}", f"ps.servers={args.servers}",
                                                     f"train.out_dir={out}"] + sets), out, args.timeout)
            row = {"mode": name, "repeat": rep, **job}
            if job["rc"] == 0:
                row.update(ps_result(out, args, b * T))
            rows.append(row)
    return rows


def ps_summary(rows: list[dict]) -> list[dict]:
    """Median over repeats per mode, with throughput and loss relative to sync (with straggler)."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode and r["rc"] == 0]
        if not rs:
            out.append({"mode": mode, "failed": True})
            continue
        med = {k: float(np.median([r[k] for r in rs])) for k in ("tokens_per_s", "val_loss", "max_gap",
                                                                   "max_staleness", "foreign_cpu_cores")
               if all(r.get(k) is not None for r in rs)}
        out.append({"mode": mode, **med, "pushes_per_worker": rs[0]["pushes_per_worker"], "runs": len(rs)})
    sync = next((r for r in out if r["mode"] == "sync" and "tokens_per_s" in r), None)
    for r in out:
        if sync and "tokens_per_s" in r:
            r["speedup_vs_sync"] = r["tokens_per_s"] / sync["tokens_per_s"]
            r["loss_vs_sync"] = r["val_loss"] / sync["val_loss"] - 1
    return out


# -- task separation --------------------------------------------------------------------------
def run_roles(args, tmp: Path) -> list[dict]:
    sets = model_sets(args) + [f"train.steps={args.roles_steps}"]
    runs = []
    for rep in range(args.roles_repeats):
        for paired in (False, True):
            out = tmp / f"roles_{len(runs)}"
            extra = ["roles.evaluators=1", f"roles.snapshot_every={args.snapshot_every}"] if paired else []
            job = launch(command(2 if paired else 1, sets + [f"train.out_dir={out}"] + extra), out, args.timeout)
            run = {"evaluator": paired, "repeat": rep, **job}
            if job["rc"] == 0:
                recs = metrics.read(out / "metrics.jsonl")
                ev = [r for r in recs if r.get("role") == "evaluator"]
                first = ev[0]["step"] if paired and len(ev) > 1 else 5
                run["step_times_s"] = [r["step_time_s"] for r in recs if "step_time_s" in r
                                       and r["step"] > max(5, first)]
                if paired:
                    pub = next(r for r in recs if r.get("role") == "publisher")
                    run.update(evaluations=len(ev), first_snapshot_step=first,
                               eval_time_s=float(np.median([r["eval_time_s"] for r in ev])),
                               snapshots_skipped=pub["snapshots_skipped"], offer_s_max=pub["offer_s_max"])
            runs.append(run)
    return runs


def roles_summary(runs: list[dict]) -> list[dict]:
    rows = []
    for paired in (False, True):
        rs = [r for r in runs if r["evaluator"] == paired and r["rc"] == 0]
        ts = [t for r in rs for t in r["step_times_s"]]
        row = {"trainer": "with evaluator" if paired else "alone", **common.summarize(ts), "runs": len(rs),
               "foreign_cpu_cores": float(np.median([r["foreign_cpu_cores"] or 0 for r in rs])) if rs else None}
        if paired and rs:
            for k in ("evaluations", "eval_time_s", "snapshots_skipped", "offer_s_max"):
                row[k] = float(np.median([r[k] for r in rs]))
        rows.append(row)
    if rows[0]["n"] and rows[1]["n"]:
        rows[1]["ratio"] = rows[1]["median_s"] / rows[0]["median_s"]
    return rows


# -- main -------------------------------------------------------------------------------------
def goals(ps_rows, role_rows) -> list[dict]:
    g = []
    by = {r["mode"]: r for r in ps_rows}
    if "async" in by and "speedup_vs_sync" in by["async"]:
        a = by["async"]
        g.append({"goal": "async/sync throughput (straggler)", "target": ">= 1.5", "value": a["speedup_vs_sync"],
                  "met": a["speedup_vs_sync"] >= GOALS["async/sync"]})
        g.append({"goal": "async val_loss vs sync", "target": "within 5%", "value": a["loss_vs_sync"],
                  "met": abs(a["loss_vs_sync"]) <= GOALS["loss_gap"]})
    if len(role_rows) > 1 and "ratio" in role_rows[1]:
        r = role_rows[1]["ratio"]
        g.append({"goal": "trainer step with evaluator / without", "target": "<= 1.05", "value": r,
                  "met": r <= GOALS["evaluator_step_ratio"]})
    return g


def main(argv=None) -> int:
    args = parse(argv or [])
    tmp = Path(tempfile.mkdtemp(prefix="hvdllm-bench-ps-"))
    L, C, H, T, b = MODELS[args.model]
    result = {"benchmark": "ps", "model": args.model, "model_shape": {"n_layer": L, "n_embd": C, "n_head": H,
              "block_size": T, "batch_per_worker": b}, "workers": args.workers, "servers": args.servers,
              "steps": args.steps, "straggler_factor": args.factor, "staleness": args.staleness,
              "backend": args.backend, "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        ps_raw = [] if args.no_ps else run_ps(args, tmp)
        roles_raw = [] if args.no_roles else run_roles(args, tmp)
    finally:
        if args.keep:
            print(f"[bench ps] runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    ps_rows, role_rows = ps_summary(ps_raw), (roles_summary(roles_raw) if roles_raw else [])
    result.update(ps_runs=ps_raw, ps=ps_rows, roles_runs=roles_raw, roles=role_rows,
                  goals=goals(ps_rows, role_rows), loadavg_end=os.getloadavg(),
                  failed=[r for r in ps_raw + roles_raw if r["rc"] != 0])
    for r in roles_raw:
        r.pop("step_times_s", None)
    if ps_rows:
        print(f"\nparameter servers: {args.workers} workers ({args.model}, batch {b} x {T} tokens each), "
              f"{args.servers} server(s), budget {args.steps} x {args.workers} pushes; worker 1 slowed "
              f"{args.factor}x except in the first row")
        common.print_table(ps_rows, [("mode", "mode"), ("tokens_per_s", "tokens/s"), ("speedup_vs_sync", "vs sync"),
                                     ("val_loss", "val_loss"), ("loss_vs_sync", "loss vs sync"),
                                     ("max_gap", "max gap"), ("max_staleness", "max stale"),
                                     ("foreign_cpu_cores", "other load (cores)")])
    if role_rows:
        print(f"\ntrainer step time (1 trainer; evaluator offered a snapshot every {args.snapshot_every} steps)")
        common.print_table(role_rows, [("trainer", "trainer"), ("median_s", "median step s"), ("p25_s", "p25"),
                                       ("p75_s", "p75"), ("n", "steps"), ("ratio", "ratio"),
                                       ("evaluations", "evals"), ("snapshots_skipped", "skipped"),
                                       ("foreign_cpu_cores", "other load (cores)")])
    if result["goals"]:
        print("\ngoals")
        common.print_table(result["goals"], ["goal", "target", "value", "met"])
    path = common.write_json(args.out, result)
    print(f"\n[bench ps] wrote {path}")
    return 0 if not result["failed"] else 1
