"""`hvdllm bench memory`: what ZeRO's stages hold per rank, measured against the ZeRO paper's
formula (hvdllm/memory.py), what they move per step against theory, their step time against
plain data parallelism, and the headline: the deepest GPT at a fixed width that trains at np=N
under a per-rank memory budget with zero=0 against zero=3 (and zero=3 with the optimizer
offloaded).

    hvdllm bench memory [--np 2] [--layers 4] [--width 256] [--seq 64] [--batch 4]
                        [--rows 0,1,2,3,3o] [--steps 6] [--backends torch[,tensorflow]]
                        [--headline --budget-gib 1.5 --headline-width 512 --max-layers 256]
                        [--out runs/bench/memory.json]

The table: one launch per backend of
    mpirun -np N ... python -m hvdllm.bench.memory_worker --rows 0,1,2,3,3o ...
(hvdllm/bench/memory_worker.py says how each figure is measured). Per row:
    params / grads / optim   bytes held per rank, measured (live arrays; gradients: what the
                             step's reductions return), and the formula's (Ψ fp32 parameters)
    peak grown               resident memory grown building the row's engine and its first steps
    ring MB                  bytes a rank sends per step over a ring for what it handed to the
                             collectives: allreduce of S 2(N-1)/N S, reduce-scatter (N-1)/N S,
                             allgather of a piece s (N-1) s
    x DP                     ring MB / zero=0's; theory 1 for zero=1 and 2 (reduce-scatter +
                             allgather = an allreduce), 1.5 for zero=3 (an allgather in forward
                             and in backward, a reduce-scatter: the paper's 3Ψ against 2Ψ)
    step x0                  median step time (slowest rank) / zero=0's, the rows interleaved
                             in rounds inside the same job

The headline (--headline): for each of zero=0, zero=3, zero=3 + offload, the largest --layers at
--headline-width that trains 2 steps with a finite loss with every rank's peak resident memory
under --budget-gib, found with real runs (depth doubled until a run does not fit, then
bisected); a watchdog in every rank ends a run at once when it passes the budget, and every run
has a deadline (--timeout). Every rank runs with glibc returning freed allocations of 64 KiB or
more at once (memory_worker.return_freed_memory: by default its heaps keep what ZeRO-3 frees,
and the peak measures the allocator, not the strategy). On a CPU machine "offload" moves nothing off a device: the
optimizer lives in the same memory, so it cannot fit more than zero=3.
A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.memory_worker import add_model_options

TAG = "[bench memory]"
MB = 1e6
MIB = 2**20
THEORY_X_DP = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.5}
HEADLINE_ROWS = ("0", "3", "3o")


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2)
    add_model_options(p)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--backends", default="torch")
    p.add_argument("--headline", action="store_true", help="also search the largest depth per stage")
    p.add_argument("--budget-gib", type=float, default=1.5, help="the headline's per-rank memory budget")
    p.add_argument("--headline-width", type=int, default=512)
    p.add_argument("--max-layers", type=int, default=256)
    common.add_env_option(p)
    common.add_output_options(p, "memory", timeout=600, plot=False)
    a = p.parse_args(argv)
    a.backend_names = common.backend_list(p, a.backends)
    rows = a.rows.split(",")
    if not rows or any(r not in ("0", "1", "2", "3", "3o") for r in rows):
        p.error(f"--rows {a.rows!r}: a comma list of 0, 1, 2, 3, 3o")
    if a.width % a.heads or a.headline_width % a.heads:
        p.error("--heads must divide --width and --headline-width")
    if min(a.np, a.layers, a.seq, a.batch, a.steps) < 1 or a.budget_gib <= 0:
        p.error("--np, --layers, --seq, --batch, --steps and --budget-gib must be positive")
    return a


def worker_command(args, backend: str, out: str, rows: str, layers: int, width: int, steps: int,
                   budget: float = 0.0) -> list[str]:
    """The exact mpirun argv of one worker launch."""
    return common.worker_command("hvdllm.bench.memory_worker", args.np, [
        "--backend", backend, "--rows", rows, "--layers", layers, "--width", width, "--heads", args.heads,
        "--seq", args.seq, "--batch", args.batch, "--vocab", args.vocab, "--steps", steps, "--warmup", 1,
        "--budget-gib", budget, "--threads", 1, "--out", out], args.env)


def analyse(result: dict) -> list[dict]:
    """The table's rows from one worker result."""
    rows = result["rows"]
    dp = next((r for r in rows if r["row"] == "0"), None)
    out = []
    for r in rows:
        f = r["formula"]
        out.append({
            "row": r["row"], "params_MB": r["params_bytes"] / MB, "params_f": f["params"] / MB,
            "grads_MB": r["grads_bytes"] / MB, "grads_f": f["grads"] / MB,
            "optim_MB": r["optimizer_bytes"] / MB, "optim_f": f["optimizer"] / MB,
            "peak_grown_MiB": r["peak_grown_bytes"] / MIB, "ring_MB": r["ring_bytes"] / MB,
            "x_dp": r["ring_bytes"] / dp["ring_bytes"] if dp and dp["ring_bytes"] else None,
            "x_dp_theory": THEORY_X_DP[r["zero"]],
            "step_ms": 1e3 * r["step_s"],
            "step_x0": r["step_s"] / dp["step_s"] if dp and dp["step_s"] else None,
        })
    return out


TABLE = [("row", "zero"), ("params_MB", "params MB"), ("params_f", "formula"), ("grads_MB", "grads MB"),
         ("grads_f", "formula"), ("optim_MB", "optim MB"), ("optim_f", "formula"),
         ("peak_grown_MiB", "peak grown MiB"), ("ring_MB", "ring MB/step"), ("x_dp", "x DP"),
         ("x_dp_theory", "theory"), ("step_ms", "step ms"), ("step_x0", "step x zero=0")]


def probe(args, backend: str, tmp: str, row: str, layers: int) -> dict:
    """One headline run: does `layers` deep fit the budget at `row`?"""
    part = Path(tmp) / f"probe-{row}-{layers}.json"
    cmd = worker_command(args, backend, str(part), row, layers, args.headline_width, 0, args.budget_gib)
    res, rc, wall = common.run_worker(cmd, part, args.timeout, TAG, f"zero={row} at {layers} layers")
    budget = args.budget_gib * 2**30
    fits = bool(res and res["finite"] and max(res["rank_peaks_bytes"]) <= budget)
    peak = max(res["rank_peaks_bytes"]) if res else None
    common.say(TAG, f"zero={row} {layers} layers: {'fits' if fits else 'does not fit'}"
                    + (f" (peak {peak / 2**30:.2f} GiB)" if peak else f" (exit {rc})"))
    return {"row": row, "layers": layers, "fits": fits, "rc": rc, "peak_rss_bytes": peak,
            "params": res["rows"][0]["params_count"] if res else None, "wall_s": wall, "command": shlex.join(cmd)}


def largest(args, backend: str, tmp: str, row: str) -> tuple[dict | None, list[dict]]:
    """The deepest fitting run: doubling from 1, then bisection between the last fit and the
    first failure. Returns (that run or None, every run)."""
    runs, lo, hi, n = [], None, None, 1
    while n <= args.max_layers:
        r = probe(args, backend, tmp, row, n)
        runs.append(r)
        if not r["fits"]:
            hi = n
            break
        lo, n = r, 2 * n
    if lo is None:
        return None, runs
    hi = hi or args.max_layers + 1
    while hi - lo["layers"] > 1:
        mid = (lo["layers"] + hi) // 2
        r = probe(args, backend, tmp, row, mid)
        runs.append(r)
        if r["fits"]:
            lo = r
        else:
            hi = mid
    return lo, runs


def headline(args, backend: str, tmp: str) -> dict:
    best, runs = {}, []
    for row in HEADLINE_ROWS:
        b, rs = largest(args, backend, tmp, row)
        best[row], runs = b, runs + rs
    rows = [{"row": row, "layers": b["layers"] if b else 0, "params": b["params"] if b else 0,
             "peak_GiB": b["peak_rss_bytes"] / 2**30 if b else None} for row, b in best.items()]
    base = best["0"]["params"] if best["0"] else None
    for r in rows:
        r["x_zero0"] = r["params"] / base if base else None
    return {"budget_gib": args.budget_gib, "width": args.headline_width, "rows": rows, "runs": runs}


def main(argv=None) -> int:
    argv = list(argv or [])
    args = parse(argv)
    out = Path(args.out)
    t_all = time.perf_counter()
    results, tables, heads, commands, failed = {}, {}, {}, [], []
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-memory-") as tmp:
        for backend in args.backend_names:
            part = Path(tmp) / f"table-{backend}.json"
            cmd = worker_command(args, backend, str(part), args.rows, args.layers, args.width, args.steps)
            commands.append(shlex.join(cmd))
            res, rc, _ = common.run_worker(cmd, part, args.timeout, TAG, f"{backend}: the table")
            if res is None:
                failed.append(backend)
                continue
            results[backend], tables[backend] = res, analyse(res)
            print(f"\nhvdllm bench memory ({backend}): np={args.np}, {args.layers} layers of width {args.width}, "
                  f"T={args.seq}, batch {args.batch}/rank, fp32 AdamW, Ψ={res['rows'][0]['params_count']:,}; "
                  f"MB = 1e6 bytes, per rank")
            common.print_table(tables[backend], TABLE)
            if args.headline:
                heads[backend] = h = headline(args, backend, tmp)
                print(f"\nthe largest GPT (width {args.headline_width}, T={args.seq}) that trains 2 steps at "
                      f"np={args.np} with every rank's peak RSS under {args.budget_gib} GiB ({backend}):")
                common.print_table(h["rows"], [("row", "zero"), ("layers", "layers"), ("params", "parameters"),
                                                ("peak_GiB", "peak GiB"), ("x_zero0", "x zero=0")])
    result = {"benchmark": "memory", "argv": ["hvdllm", "bench", "memory", *argv], "commands": commands,
              "np": args.np, "tables": tables, "headline": heads, "results": results, "failed": failed,
              "cores": common.cores(), "wall_s": time.perf_counter() - t_all}
    path = common.write_json(out, result)
    common.say(TAG, f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
