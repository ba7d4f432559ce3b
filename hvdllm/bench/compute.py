"""`hvdllm bench compute`: hvdllm's training step against a plain-framework loop of the same model,
per compute setting, in the same process.

    hvdllm bench compute [--backends torch,tensorflow] [--settings fp32,bf16,fp32+ckpt,fp32+compile,bf16+compile]
                         [--layers 4] [--width 256] [--seq 256] [--batch 8] [--threads 1]
                         [--steps 8] [--warmup 2] [--out runs/bench/compute.json]

For each backend, one `mpirun -np 1 python -m hvdllm.bench.compute_worker` (see its docstring:
the two loops, the interleaved timing, how activation memory is measured). Per setting and
loop: median step time, tokens/s, MFU (against the backend's matmul peak on the same threads,
hvdllm/mfu.py), the step's peak resident memory and its activation memory; for hvdllm's row the
ratio of medians to the plain loop (`vs plain`) and the median of the per-round ratios
(`paired`, which survives a changing machine load better).
Goals (CPU): hvdllm / plain <= 1.02 for each setting; full checkpointing (fp32+ckpt) keeps at
least 2x less activation memory than fp32 at <= 1.4x its step time (`ckpt cost`: the step
against the same step without checkpointing, timed in the same rounds).

A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.compute_worker import SETTINGS

TAG = "[bench compute]"
# glibc hands freed blocks of 64 KiB and more back to the system at once: the resident memory a
# step adds is then what it holds, not what an earlier step left cached; TensorFlow's CPU
# allocator as BFC, which counts its bytes in use and their peak (compute_worker.memory)
MEMORY_ENV = ["MALLOC_MMAP_THRESHOLD_=65536", "MALLOC_TRIM_THRESHOLD_=0", "TF_CPU_ALLOCATOR_USE_BFC=true"]


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench compute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,tensorflow")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="compute threads")
    common.add_timing_options(p, steps=8, warmup=2)
    common.add_output_options(p, "compute", plot=False)
    args = p.parse_args(argv)
    args.backend_names = common.backend_list(p, args.backends)
    bad = [s for s in args.settings.split(",") if s.strip() not in SETTINGS]
    if bad:
        p.error(f"--settings: {bad} not among {', '.join(SETTINGS)}")
    return args


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the rows of one backend (said, never failed on)."""
    out = []
    by = {(r["setting"], r["loop"]): r for r in rows}
    for r in rows:
        if r["loop"] == "hvdllm":
            ok = r["paired"] <= 1.02
            out.append(f"{r['setting']}: hvdllm / plain {r['paired']:.3f} (paired) {'<=' if ok else '>'} 1.02")
    base, ck = by.get(("fp32", "hvdllm")), by.get(("fp32+ckpt", "hvdllm"))
    if base and ck and min(base["act_mib"], ck["act_mib"]) < 1:
        out.append("full checkpointing: activation memory under 1 MiB, too small for the 5 ms sampling "
                   "to see (a larger --width / --seq / --batch)")
    elif base and ck:
        mem, slow = base["act_mib"] / max(ck["act_mib"], 1e-9), ck["vs_keep_paired"]
        out.append(f"full checkpointing: {mem:.2f}x less activation memory (goal >= 2), "
                   f"{slow:.2f}x the step time, paired (goal <= 1.4)")
    return out


def main(argv=None) -> int:
    args = parse(list(argv or []))
    result = {"benchmark": "compute", "argv": ["hvdllm", "bench", "compute", *(argv or [])], "rows": [],
              "commands": [], "failed": [], "goals": {}}
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-compute-") as tmp:
        part = Path(tmp) / "part.json"
        for backend in args.backend_names:
            cmd = common.worker_command(
                "hvdllm.bench.compute_worker", 1,
                ["--backend", backend, "--out", part, "--settings", args.settings, "--layers", args.layers,
                 "--width", args.width, "--heads", args.heads, "--seq", args.seq, "--batch", args.batch,
                 "--threads", args.threads, "--steps", args.steps, "--warmup", args.warmup,
                 "--per-round", args.per_round],
                env=MEMORY_ENV)
            result["commands"].append(shlex.join(cmd))
            run, rc, wall = common.run_worker(cmd, part, args.timeout, TAG, f"{backend}")
            if run is None:
                result["failed"].append(shlex.join(cmd))
                continue
            rows = [{"backend": backend, **r} for r in run["rows"]]
            result["rows"] += rows
            result["goals"][backend] = goals(rows)
    if result["rows"]:
        print(f"\n{TAG} {args.layers} layers x {args.width}, T={args.seq}, batch {args.batch}, "
              f"{args.threads} thread(s), np=1; {args.steps} steps of each loop, interleaved")
        common.print_table(result["rows"], [
            ("backend", "backend"), ("setting", "setting"), ("loop", "loop"), ("median_s", "median step s"),
            ("p25_s", "p25"), ("p75_s", "p75"), ("vs_plain", "vs plain"), ("paired", "paired"),
            ("vs_keep_paired", "ckpt cost"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
            ("peak_mib", "peak MiB"), ("act_mib", "act MiB")])
        for backend, lines in result["goals"].items():
            for line in lines:
                print(f"{TAG} {backend} {line}")
    path = common.write_json(args.out, result)
    print(f"\n{TAG} wrote {path}")
    return 1 if result["failed"] else 0
