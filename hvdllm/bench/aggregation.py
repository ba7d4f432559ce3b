"""`hvdllm bench aggregation`: how fast and how costly our gradient aggregation is.

    hvdllm bench aggregation [--np 2] [--backends torch,tensorflow] [--sizes 1KB..256MB]
                             [--out runs/bench/aggregation.json] [--no-train] [--no-profile] [--no-tune]

Sections (the launches are printed as they start; every figure is in the JSON):

1. bandwidth   One `mpirun -np NP ... python -m hvdllm.bench.aggregation_worker` per backend times,
               interleaved on the same numpy buffers, the backend's Collectives.allreduce (op sum,
               float32; 'hvdllm'), NumpyCollectives.allreduce ('numpy path': numpy in and out, the
               host boundary's cost), mpi4py comm.Allreduce ('mpi4py', the baseline) and mpi4py comm.Sendrecv of
               the same bytes to the ring neighbour ('p2p'). Sizes 1 KB (KiB) .. 256 MB (MiB) in
               powers of 4; median of several calls (fewer at large sizes), each call timed on the
               slowest rank after a barrier. As in nccl-tests:
                   algbw = bytes / time        busbw = algbw * 2(n-1)/n
               Ring bound: a ring allreduce moves 2(n-1)/n * bytes over each rank's link, one
               direction, while the link is busy both ways; busbw is exactly that rate, so it cannot
               exceed the per-direction bandwidth of a bidirectional exchange of the same size:
                   p2p bw = bytes / time(Sendrecv of `bytes` out and `bytes` in on every rank)
               `of bound` = busbw / p2p bw (reduction arithmetic costs memory traffic p2p does not).
2. compression Collectives.allreduce with compression none / fp16 / bf16 at a few sizes: time,
               speed-up over none, wire bytes per rank. bf16 travels as an allgather of 16-bit
               patterns (Horovod 0.28 rejects bfloat16): (n-1) * 2 B/param received per rank against
               2(n-1)/n * 4 B for fp32 -- a win only at small dp (equal at dp=4, a loss above).
3. zero        Engine with parallel.zero=0 and =1 on the same model (default 4x256), stepped
               alternately: optimizer_state_bytes() per rank (expect 1/dp of plain) and step-time
               ratio ZeRO-1 / plain DP, at np=NP and (oversubscribed) the extra --zero-np values.
4. local SGD   Bytes per step (DP: the gradient, every step; local SGD: the parameters, every H
               steps; ZeRO-1: a reduce-scatter + all-gather, the same bytes as DP), with the time
               that costs at the bandwidth measured in 1; then real `hvdllm train` runs under mpirun
               (the integration tests' tiny GPT, --train-steps steps) for DP, local SGD H=4 and DiLoCo
               (outer lr 0.7, momentum 0.9): final loss at equal tokens.
5. profile     Where the time of a large Horovod allreduce goes (sizes >= 16 MB; own launch, as
               Horovod's timeline must be enabled at init): the hvdllm call, a grouped allreduce of
               the same bytes in 16 tensors (Tensor Fusion), Horovod's in-place allreduce (torch),
               mpi4py into a kept and into a fresh buffer, first-touch of a fresh buffer, and
               Horovod's timeline phases. --tune repeats it under aggregation.fusion_threshold_mb /
               aggregation.cycle_time_ms settings (and one allocator setting) at --tune-sizes.

Goals: hvdllm busbw >= 0.95 x mpi4py's at >= 16 MB; ZeRO-1 step <= 1.1 x plain DP.
Prints a table per section, writes JSON, and a PNG next to it (busbw vs size, log-x).
A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.aggregation_worker import ZERO_MODELS, human, zero_config
from hvdllm.bench.common import MB, med
from hvdllm.runtime import cores

TAG = "[bench aggregation]"
GOALS = {"hvdllm/mpi4py busbw at >= 16 MB": 0.95, "zero1/dp step": 1.1}
GOAL_MIN_BYTES = 16 * MB
UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
# The tiny GPT of tests/integration/test_integration.py, scaled from 6 to --train-steps steps.
TRAIN_SETS = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
              "data.max_bytes=400000", "train.eval_every=0", "train.eval_batches=8", "train.threads=1",
              "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=6", "optim.lr=3e-3",
              "train.batch_size=4"]
TRAIN_RUNS = {  # name: (description, --set overrides)
    "dp": ("data parallel (gradient allreduce every step)", []),
    "local_sgd_h4": ("local SGD H=4 (parameter average every 4 steps)", ["localsgd.every=4"]),
    "diloco_h4": ("DiLoCo H=4, outer lr 0.7, Nesterov momentum 0.9",
                  ["localsgd.every=4", "localsgd.outer_lr=0.7", "localsgd.outer_momentum=0.9"]),
}
# --tune: label -> (fusion_threshold_mb, cycle_time_ms, extra environment)
TUNE = {
    "fusion_threshold_mb=512": (512.0, 0.0, []),
    "fusion_threshold_mb=4": (4.0, 0.0, []),
    "cycle_time_ms=0.2": (0.0, 0.2, []),
    "cycle_time_ms=5": (0.0, 5.0, []),
    # not an hvdllm setting: glibc keeps freed blocks (no mmap/munmap per large allocation)
    "env MALLOC_MMAP_MAX_=0": (0.0, 0.0, ["MALLOC_MMAP_MAX_=0", "MALLOC_TRIM_THRESHOLD_=17179869184"]),
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or (m.group(2).upper() or "B") not in UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 1KB, 16MB; K/M/G are powers of 1024)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper() or "B"])


def parse_sizes(text: str) -> list[int]:
    """'1KB..256MB' (powers of 4 from the first), '1KB..256MB:2' (powers of 2), or '1KB,16MB'."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            rng, _, step = part.partition(":")
            lo, hi = (parse_size(x) for x in rng.split(".."))
            k = int(step) if step else 4
            if k < 2 or lo < 4:
                raise ValueError(f"{part!r}: need a step >= 2 and a start >= 4 B")
            s = lo
            while s <= hi:
                out.append(s)
                s *= k
        else:
            out.append(parse_size(part))
    bad = [s for s in out if s < 4 or s % 64]
    if bad:
        raise ValueError(f"sizes must be multiples of 64 B: {bad}")
    return sorted(set(out))


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench aggregation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--backends", default="torch,tensorflow", help="comma list: torch,tensorflow")
    p.add_argument("--sizes", default="1KB..256MB", help="allreduce sizes: A..B (powers of 4), A..B:2, or a list")
    p.add_argument("--reps", type=int, default=10,
                   help="timed calls per variant at >= 16 MB (2x below, 5x below 1 MB)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant and size")
    p.add_argument("--compress-sizes", default="4MB,16MB,64MB", help="sizes of the compression section")
    p.add_argument("--zero-model", default="small", help="ZeRO section's GPT: tiny | small (4x256) | medium")
    p.add_argument("--zero-np", default="2,4", help="rank counts of the ZeRO section (> cores: oversubscribed)")
    p.add_argument("--zero-steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--zero-warmup", type=int, default=2)
    p.add_argument("--no-profile", action="store_true", help="skip the large-message profile launch")
    p.add_argument("--profile-reps", type=int, default=0, help="timed calls in the profile (0: max(3, reps/2))")
    p.add_argument("--no-tune", action="store_true", help="skip the Horovod settings sweep")
    p.add_argument("--tune", default=",".join(TUNE), help=f"settings to sweep, comma list of: {', '.join(TUNE)}")
    p.add_argument("--tune-sizes", default="16MB,64MB", help="sizes of the settings sweep")
    p.add_argument("--tune-backends", default="", help="backends of the sweep (default: --backends)")
    p.add_argument("--no-train", action="store_true", help="skip the local-SGD training runs")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--train-backend", default="", help="backend of the training runs (default: the first)")
    p.add_argument("--localsgd-h", default="1,4,16", help="H values of the bytes-per-step table")
    p.add_argument("--fusion-threshold-mb", type=float, default=0.0,
                   help="aggregation.fusion_threshold_mb for every launch (0: Horovod's default, 128)")
    p.add_argument("--cycle-time-ms", type=float, default=0.0,
                   help="aggregation.cycle_time_ms for every launch (0: Horovod's default, 1)")
    common.add_env_option(p)
    common.add_output_options(p, "aggregation")
    p.add_argument("--from-json", metavar="JSON",
                   help="re-analyse the launches kept in an earlier run's JSON instead of launching")
    a = p.parse_args(argv)
    a.backends = common.backend_list(p, a.backends)
    try:
        a.sizes = parse_sizes(a.sizes)
        a.compress_sizes = parse_sizes(a.compress_sizes) if a.compress_sizes.strip() else []
        a.tune_sizes = parse_sizes(a.tune_sizes) if a.tune_sizes.strip() else []
    except ValueError as e:
        p.error(str(e))
    a.zero_np = sorted({int(v) for v in a.zero_np.split(",") if v.strip()}) if a.zero_np.strip() else []
    a.localsgd_h = [int(v) for v in a.localsgd_h.split(",") if v.strip()]
    a.tune = [t.strip() for t in a.tune.split(",") if t.strip()]
    unknown = [t for t in a.tune if t not in TUNE]
    if unknown:
        p.error(f"--tune: {unknown} not among {', '.join(TUNE)}")
    a.tune_backends = common.backend_list(p, a.tune_backends, "--tune-backends") \
        if a.tune_backends.strip() else a.backends
    a.train_backend = a.train_backend or a.backends[0]
    a.profile_reps = a.profile_reps or max(3, a.reps // 2)
    if a.zero_model not in ZERO_MODELS:
        p.error(f"--zero-model: {a.zero_model!r} not among {', '.join(ZERO_MODELS)}")
    if a.np < 2 or a.reps < 1 or a.warmup < 0 or a.zero_steps < 1 or a.train_steps < 1 \
            or any(n < 1 for n in a.zero_np) or any(h < 1 for h in a.localsgd_h):
        p.error("need --np >= 2, --reps/--zero-steps/--train-steps >= 1, --warmup >= 0, H >= 1")
    return a


# ---------------------------------------------------------------------------------------------
# launching

def worker_command(args, np_: int, backend: str, sections: list[str], out: str, sizes=None,
                   reps: int | None = None, fusion: float | None = None, cycle: float | None = None,
                   env: list[str] = ()) -> list[str]:
    """The exact mpirun argv of one worker launch."""
    argv = ["--backend", backend, "--sections", ",".join(sections), "--reps", reps or args.reps,
            "--warmup", args.warmup,
            "--fusion-threshold-mb", f"{args.fusion_threshold_mb if fusion is None else fusion:g}",
            "--cycle-time-ms", f"{args.cycle_time_ms if cycle is None else cycle:g}", "--threads", 1]
    if "bandwidth" in sections or "profile" in sections:
        argv += ["--sizes", ",".join(str(s) for s in (sizes or args.sizes))]
    if "compression" in sections:
        argv += ["--compress-sizes", ",".join(map(str, args.compress_sizes))]
    if "zero" in sections:
        argv += ["--zero-model", args.zero_model, "--zero-steps", args.zero_steps,
                 "--zero-warmup", args.zero_warmup]
    return common.worker_command("hvdllm.bench.aggregation_worker", np_, argv + ["--out", out],
                                 [*args.env, *env])


def train_command(args, name: str, out_dir: Path) -> list[str]:
    sets = [f"backend={args.train_backend}", f"train.steps={args.train_steps}",
            f"train.checkpoint_every={args.train_steps}", *TRAIN_SETS, f"train.out_dir={out_dir}",
            *TRAIN_RUNS[name][1]]
    return common.worker_command("hvdllm", args.np, ["train"] + [a for kv in sets for a in ("--set", kv)],
                                 args.env)


# ---------------------------------------------------------------------------------------------
# analysis

def busbw(nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests' bus bandwidth of an allreduce, GB/s (1e9 B/s)."""
    return nbytes / seconds * 2 * (n - 1) / n / 1e9 if seconds > 0 else math.nan


def bandwidth_rows(run: dict) -> list[dict]:
    n, rows = run["np"], []
    for r in run.get("bandwidth") or []:
        m = {k: med(v) for k, v in r["times_s"].items()}
        size = r["bytes"]
        p2p = size / m["p2p"] / 1e9
        bw = {k: busbw(size, m[k], n) for k in ("hvdllm", "hvdllm_np", "mpi4py")}
        t = r["times_s"]  # call i of each variant ran in the same round: drift largely cancels
        paired = med([b / a for a, b in zip(t["hvdllm"], t["mpi4py"])])
        rows.append({"backend": run["backend"], "size": r["size"], "bytes": size, "reps": r["reps"],
                     "hvdllm_ms": m["hvdllm"] * 1e3, "mpi4py_ms": m["mpi4py"] * 1e3,
                     "hvdllm_busbw": bw["hvdllm"], "mpi4py_busbw": bw["mpi4py"],
                     "ratio": bw["hvdllm"] / bw["mpi4py"], "paired": paired, "numpy_busbw": bw["hvdllm_np"],
                     "numpy_ratio": bw["hvdllm_np"] / bw["mpi4py"], "p2p_bw": p2p,
                     "hvdllm_of_bound": bw["hvdllm"] / p2p, "mpi4py_of_bound": bw["mpi4py"] / p2p,
                     "same_sum": "yes" if r["max_abs_diff_vs_mpi4py"] == 0 else f"{r['max_abs_diff_vs_mpi4py']:.1e}"})
    return rows


BW_TABLE = [("backend", "backend"), ("size", "size"), ("reps", "reps"), ("hvdllm_ms", "hvdllm ms"),
            ("mpi4py_ms", "mpi4py ms"), ("hvdllm_busbw", "hvdllm busbw GB/s"),
            ("mpi4py_busbw", "mpi4py busbw GB/s"), ("ratio", "hvdllm/mpi4py"), ("paired", "paired"),
            ("numpy_busbw", "numpy-path busbw"), ("numpy_ratio", "numpy/mpi4py"),
            ("p2p_bw", "p2p GB/s (bound)"), ("hvdllm_of_bound", "hvdllm of bound"),
            ("mpi4py_of_bound", "mpi4py of bound"), ("same_sum", "same sum")]


def wire_bytes(params: int, n: int, compression: str) -> float:
    """Bytes each rank sends for one allreduce of `params` floats (ring; bf16: allgather)."""
    if compression == "bf16":
        return (n - 1) * 2 * params
    return 2 * (n - 1) / n * params * (2 if compression == "fp16" else 4)


def compression_rows(run: dict) -> list[dict]:
    n, rows = run["np"], []
    for r in run.get("compression") or []:
        m = {k: med(v) for k, v in r["times_s"].items()}
        P = r["bytes"] // 4
        e = r["max_err_rel_to_max"]
        rows.append({"backend": run["backend"], "np": n, "size": r["size"], "reps": r["reps"],
                     "none_ms": m["none"] * 1e3, "fp16_ms": m["fp16"] * 1e3, "bf16_ms": m["bf16"] * 1e3,
                     "fp16_speedup": m["none"] / m["fp16"], "bf16_speedup": m["none"] / m["bf16"],
                     "wire": "/".join(human(wire_bytes(P, n, c)) for c in ("none", "fp16", "bf16")),
                     "fp16_err": e["fp16"], "bf16_err": e["bf16"]})
    return rows


# compression cannot speed the allreduce up more than rank-count-fold
CMP_LIMITS = {"fp16_speedup": lambda r: r["np"], "bf16_speedup": lambda r: r["np"]}
CMP_TABLE = [("backend", "backend"), ("size", "size"), ("reps", "reps"), ("none_ms", "none ms"),
             ("fp16_ms", "fp16 ms"), ("bf16_ms", "bf16 ms"), ("fp16_speedup", "fp16 speed-up"),
             ("bf16_speedup", "bf16 speed-up"), ("wire", "sent/rank none/fp16/bf16"),
             ("fp16_err", "fp16 max err"), ("bf16_err", "bf16 max err")]


def zero_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        z = run.get("zero")
        if not z:
            continue
        sb = z["optimizer_state_bytes"]
        t = {k: med(v) for k, v in z["times_s"].items()}
        paired = [a / b for a, b in zip(z["times_s"]["zero1"], z["times_s"]["dp"])]
        rows.append({"backend": run["backend"], "np": z["np"], "model": z["model"], "params": z["params"],
                     "dp_state_mb": max(sb["dp"]) / MB, "zero_state_mb": max(sb["zero1"]) / MB,
                     "state_ratio": max(sb["zero1"]) / max(sb["dp"]), "ideal": 1 / z["np"],
                     "dp_step_s": t["dp"], "zero_step_s": t["zero1"], "step_ratio": t["zero1"] / t["dp"],
                     "paired_ratio": med(paired), "steps": z["steps"],
                     "weights_diff": z["weights_max_abs_diff"], "foreign_cores": z.get("foreign_cpu_cores")})
    return rows


ZERO_TABLE = [("backend", "backend"), ("np", "np"), ("model", "model"), ("params", "params"),
              ("dp_state_mb", "DP optim MB/rank"), ("zero_state_mb", "ZeRO-1 optim MB/rank"),
              ("state_ratio", "ZeRO/DP state"), ("ideal", "1/dp"), ("dp_step_s", "DP step s"),
              ("zero_step_s", "ZeRO-1 step s"), ("step_ratio", "ZeRO/DP step"),
              ("paired_ratio", "paired median"), ("steps", "steps"), ("weights_diff", "max |w diff|")]


def allreduce_time(bw_rows: list[dict], nbytes: float) -> float | None:
    """Measured hvdllm allreduce seconds at `nbytes`, log-log interpolated between sizes."""
    pts = sorted((r["bytes"], r["hvdllm_ms"] / 1e3) for r in bw_rows)
    if not pts or nbytes <= 0:
        return None
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
        if s0 <= nbytes <= s1:
            f = math.log(nbytes / s0) / math.log(s1 / s0)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return pts[-1][1] * nbytes / pts[-1][0]  # beyond the largest: bandwidth-bound, linear


def comm_rows(params: int, model_label: str, n: int, hs: list[int], bw_rows: list[dict]) -> list[dict]:
    """Bytes per optimizer step per rank for each strategy (the scalar loss allreduce, 4 B, that
    every strategy sends for logging, is left out)."""
    P4 = 4 * params
    dp_wire = wire_bytes(params, n, "none")
    rows = []

    def add(strategy, H, msgs, payload, wire, t):
        rows.append({"model": model_label, "strategy": strategy, "H": H, "messages": msgs,
                     "payload_per_step": human(payload), "payload_bytes": payload,
                     "sent_per_step": human(wire), "sent_bytes": wire, "vs_dp": wire / dp_wire,
                     "est_ms": t * 1e3 if t is not None else None})
    t_full = allreduce_time(bw_rows, P4)
    add("DP (grouped allreduce)", 1, "1 allreduce", P4, dp_wire, t_full)
    add("DP, fp16 wire", 1, "1 allreduce", P4 / 2, wire_bytes(params, n, "fp16"), None)
    add("DP, bf16 wire (allgather)", 1, "1 allgather", P4 / 2 * (n - 1), wire_bytes(params, n, "bf16"), None)
    add("ZeRO-1", 1, "reducescatter+allgather", P4, dp_wire, t_full)
    for h in hs:
        add(f"local SGD / DiLoCo H={h}", h, f"1 allreduce / {h} steps", P4 / h, dp_wire / h,
            t_full / h if t_full is not None else None)
    return rows


COMM_TABLE = [("model", "model"), ("strategy", "strategy"), ("messages", "messages"),
              ("payload_per_step", "payload/step"), ("sent_per_step", "sent/rank/step"),
              ("vs_dp", "vs DP"), ("est_ms", "est. comm ms/step")]


def train_rows(train: list[dict]) -> list[dict]:
    rows = []
    for t in train:
        recs = t.get("records") or []
        losses = [r["loss"] for r in recs if "loss" in r]
        val = [r["val_loss"] for r in recs if "val_loss" in r]
        rows.append({"run": t["name"], "what": TRAIN_RUNS[t["name"]][0], "steps": len(losses),
                     "tokens": t.get("tokens"), "loss_first": losses[0] if losses else None,
                     "loss_last5": statistics.fmean(losses[-5:]) if losses else None,
                     "val_loss": val[-1] if val else None, "wall_s": t.get("wall_s"),
                     "status": "ok" if t.get("exit") == 0 else f"exit {t.get('exit')}"})
    return rows


TRAIN_TABLE = [("run", "run"), ("what", "strategy"), ("steps", "steps"), ("tokens", "tokens"),
               ("loss_first", "loss step 1"), ("loss_last5", "train loss (last 5)"),
               ("val_loss", "final val loss"), ("wall_s", "wall s"), ("status", "status")]


def profile_rows(run: dict, setting: str) -> list[dict]:
    rows = []
    for r in run.get("profile") or []:
        m = {k: med(v) * 1e3 for k, v in r["times_s"].items()}
        grouped = next((k for k in m if k.startswith("hvdllm_grouped")), None)
        tl = (r.get("timeline_median_s") or {}).get("hvdllm", {})
        tlg = (r.get("timeline_median_s") or {}).get(grouped, {}) if grouped else {}
        inside = (tl.get("NEGOTIATE_ALLREDUCE", 0) + tl.get("ALLREDUCE", 0)) * 1e3 if tl else None
        rows.append({"backend": run["backend"], "setting": setting, "size": r["size"], "bytes": r["bytes"],
                     "reps": r["reps"], "hvdllm_ms": m["hvdllm"], "grouped_ms": m.get(grouped),
                     "inplace_ms": m.get("horovod_inplace"), "mpi4py_ms": m["mpi4py"],
                     "fresh_ms": m["mpi4py_fresh_out"], "touch_ms": m["first_touch"],
                     "ratio": m["mpi4py"] / m["hvdllm"],
                     "grouped_ratio": m["mpi4py"] / m[grouped] if grouped else None,
                     "tl_negotiate_ms": tl.get("NEGOTIATE_ALLREDUCE", 0) * 1e3 if tl else None,
                     "tl_mpi_ms": tl.get("MPI_ALLREDUCE", 0) * 1e3 if tl else None,
                     "outside_ms": m["hvdllm"] - inside if inside is not None else None,
                     "tl_grouped_mpi_ms": tlg.get("MPI_ALLREDUCE", 0) * 1e3 if tlg else None,
                     "tl_grouped_memcpy_ms": (tlg.get("MEMCPY_IN_FUSION_BUFFER", 0)
                                              + tlg.get("MEMCPY_OUT_FUSION_BUFFER", 0)) * 1e3 if tlg else None})
    return rows


PROFILE_TABLE = [("backend", "backend"), ("setting", "setting"), ("size", "size"), ("reps", "reps"),
                 ("hvdllm_ms", "hvdllm ms"), ("mpi4py_ms", "mpi4py ms"), ("ratio", "hvdllm/mpi4py"),
                 ("inplace_ms", "hvd in-place ms"), ("fresh_ms", "mpi4py fresh-out ms"),
                 ("touch_ms", "first-touch ms"), ("tl_negotiate_ms", "tl negotiate"),
                 ("tl_mpi_ms", "tl MPI_ALLREDUCE"), ("outside_ms", "outside tl"),
                 ("grouped_ms", "grouped16 ms"), ("grouped_ratio", "grouped/mpi4py"),
                 ("tl_grouped_mpi_ms", "tl grouped MPI"), ("tl_grouped_memcpy_ms", "tl fusion memcpy")]


def goal_rows(bw: list[dict], zr: list[dict]) -> list[dict]:
    goals = []
    for backend in dict.fromkeys(r["backend"] for r in bw):
        big = [r for r in bw if r["backend"] == backend and r["bytes"] >= GOAL_MIN_BYTES]
        if not big:
            continue
        worst = min(big, key=lambda r: r["ratio"])
        goals.append({"backend": backend, "goal": "hvdllm/mpi4py busbw, every size >= 16 MB",
                      "value": worst["ratio"], "where": f"worst at {worst['size']}; "
                      + ", ".join(f"{r['size']} {r['ratio']:.2f} (paired {r['paired']:.2f})" for r in big),
                      "target": f">= {GOALS['hvdllm/mpi4py busbw at >= 16 MB']:.2f}",
                      "met": "yes" if worst["ratio"] >= GOALS["hvdllm/mpi4py busbw at >= 16 MB"] else "NO"})
    for r in zr:
        goals.append({"backend": r["backend"], "goal": f"ZeRO-1 / DP step time (np={r['np']}, {r['model']})",
                      "value": r["step_ratio"], "where": f"paired median {r['paired_ratio']:.3f}",
                      "target": f"<= {GOALS['zero1/dp step']:.2f}",
                      "met": "yes" if r["step_ratio"] <= GOALS["zero1/dp step"] else "NO"})
    return goals


GOAL_TABLE = [("backend", "backend"), ("goal", "goal"), ("value", "value"), ("target", "target"),
              ("met", "met"), ("where", "detail")]


# ---------------------------------------------------------------------------------------------
# plot

def plot(bw: list[dict], profile: list[dict], path: Path, title: str) -> Path | None:
    plt = common.pyplot(TAG)
    if plt is None:
        return None
    backends = list(dict.fromkeys(r["backend"] for r in bw))
    colors = {"torch": "tab:red", "tensorflow": "tab:orange"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for b in backends:
        rs = sorted((r for r in bw if r["backend"] == b), key=lambda r: r["bytes"])
        x = [r["bytes"] for r in rs]
        c = colors.get(b, "tab:blue")
        ax.plot(x, [r["hvdllm_busbw"] for r in rs], "o-", color=c, label=f"hvdllm ({b})")
        ax.plot(x, [r["numpy_busbw"] for r in rs], "x:", color=c, alpha=0.7, label=f"hvdllm numpy path ({b})")
        ax.plot(x, [r["mpi4py_busbw"] for r in rs], "s--", color="tab:blue", alpha=0.5 + 0.4 * (b == backends[0]),
                label=f"mpi4py Allreduce ({b} job)")
        ax.plot(x, [r["p2p_bw"] for r in rs], "^-", color="gray", alpha=0.35 + 0.3 * (b == backends[0]),
                label=f"p2p Sendrecv = ring bound ({b} job)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvspan(GOAL_MIN_BYTES, max([r["bytes"] for r in bw] + [GOAL_MIN_BYTES]) * 1.5, color="green", alpha=0.06)
    ticks = sorted({r["bytes"] for r in bw})
    ax.set_xticks(ticks, [human(t) for t in ticks], fontsize=7, rotation=45)
    ax.set_xlabel("message size (float32 allreduce, op sum)")
    ax.set_ylabel("bus bandwidth GB/s = bytes/t x 2(n-1)/n")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=6.5, loc="upper left")
    # right: hvdllm / mpi4py, with the goal line
    for b in backends:
        rs = sorted((r for r in bw if r["backend"] == b), key=lambda r: r["bytes"])
        ax2.plot([r["bytes"] for r in rs], [r["ratio"] for r in rs], "o-", color=colors.get(b, "tab:blue"),
                 label=f"hvdllm/mpi4py ({b})")
        ax2.plot([r["bytes"] for r in rs], [r["numpy_ratio"] for r in rs], "x:", color=colors.get(b, "tab:blue"),
                 alpha=0.6, label=f"numpy path/mpi4py ({b})")
    inpl = [r for r in profile if r["setting"] == "default" and r.get("inplace_ms")]
    if inpl:
        ax2.plot([r["bytes"] for r in inpl], [r["mpi4py_ms"] / r["inplace_ms"] for r in inpl], "D",
                 color="tab:green", label="Horovod in-place allreduce_ (profile job, torch)")
    ax2.axhline(GOALS["hvdllm/mpi4py busbw at >= 16 MB"], color="green", ls="--", lw=1, label="goal 0.95 (>= 16 MB)")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.axvspan(GOAL_MIN_BYTES, max([r["bytes"] for r in bw] + [GOAL_MIN_BYTES]) * 1.5, color="green", alpha=0.06)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ticks, [human(t) for t in ticks], fontsize=7, rotation=45)
    ax2.set_ylabel("busbw ratio vs mpi4py (same job, interleaved)")
    ax2.set_title("hvdllm / mpi4py", fontsize=9)
    ax2.grid(True, alpha=0.2)
    ax2.legend(fontsize=6.5)
    return common.save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------

def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv=None) -> int:
    argv = list(argv or [])
    args = parse(argv)
    if args.from_json:
        old = common.read_json(args.from_json)
        then = parse(old["argv"][3:])  # the settings of that run; output where asked now
        then.out, then.no_plot = args.out, args.no_plot
        return report(then, old["argv"], old["runs"], old["train_runs"], old["commands"], old["failed"],
                      old["wall_s"], old["loadavg_start"], old["loadavg_end"])
    out = Path(args.out)
    profile_sizes = [s for s in args.sizes if s >= GOAL_MIN_BYTES]
    plan = []  # (label, np, backend, sections, kwargs)
    for b in args.backends:
        plan.append((f"{b} np={args.np}: bandwidth, compression, zero", args.np, b,
                     ["bandwidth", "compression"] + (["zero"] if args.np in args.zero_np else []), {}))
        for n in args.zero_np:
            if n != args.np:
                plan.append((f"{b} np={n}: zero", n, b, ["zero"], {}))
        if not args.no_profile and profile_sizes:
            plan.append((f"{b} np={args.np}: profile (default settings)", args.np, b, ["profile"],
                         {"sizes": profile_sizes, "reps": args.profile_reps, "setting": "default"}))
    if not args.no_tune and not args.no_profile and args.tune_sizes:
        for b in args.tune_backends:
            for label in args.tune:
                fusion, cycle, env = TUNE[label]
                plan.append((f"{b} np={args.np}: profile with {label}", args.np, b, ["profile"],
                             {"sizes": args.tune_sizes, "reps": args.profile_reps, "fusion": fusion or None,
                              "cycle": cycle or None, "env": env, "setting": label}))
    n_train = 0 if args.no_train else len(TRAIN_RUNS)
    common.say(TAG, f"np={args.np}, backends {', '.join(args.backends)}; sizes {human(args.sizes[0])}.."
                    f"{human(args.sizes[-1])} ({len(args.sizes)}); {len(plan)} worker launches + {n_train} "
                    f"training runs; {cores()} cores, load average {os.getloadavg()[0]:.1f}")
    runs, commands, failed = [], [], []
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-agg-") as tmp:
        for i, (label, n, backend, sections, kw) in enumerate(plan, 1):
            part = os.path.join(tmp, f"{i:02d}.json")
            setting = kw.pop("setting", None)
            cmd = worker_command(args, n, backend, sections, part, **kw)
            commands.append(shlex.join(cmd))
            run, rc, wall = common.run_worker(cmd, part, args.timeout, TAG, f"({i}/{len(plan)}) {label}")
            if run is None:
                failed.append({"label": label, "exit": rc, "command": shlex.join(cmd)})
                continue
            run.update({"label": label, "command": shlex.join(cmd), "launch_wall_s": wall, "setting": setting})
            runs.append(run)
            fc = run.get("foreign_cpu_cores")
            busy = f"; other processes kept {fc:.1f} of {cores()} cores busy meanwhile" if fc is not None else ""
            common.say(TAG, f"({i}/{len(plan)}) done in {wall:.0f} s{busy}")

        train = []
        if not args.no_train:
            tdir = out.with_name(out.stem + "_train")
            for j, name in enumerate(TRAIN_RUNS, 1):
                odir = tdir / name
                if odir.exists():  # a fresh run, never a resume of an older one
                    import shutil
                    shutil.rmtree(odir)
                cmd = train_command(args, name, odir)
                commands.append(shlex.join(cmd))
                common.say(f"\n{TAG}", f"training ({j}/{len(TRAIN_RUNS)}) {name}: {TRAIN_RUNS[name][0]}:\n  "
                                        f"{shlex.join(cmd)}")
                t0 = time.perf_counter()
                rc, tail = common.launch(cmd, args.timeout, TAG, quiet=True)
                from hvdllm import metrics
                recs = metrics.read(odir / "metrics.jsonl") if (odir / "metrics.jsonl").exists() else []
                wall = time.perf_counter() - t0
                if rc != 0:
                    common.say(TAG, f"training {name} FAILED (exit {rc}):\n{tail}")
                    failed.append({"label": f"train {name}", "exit": rc, "command": shlex.join(cmd)})
                else:
                    common.say(TAG, f"training {name} done in {wall:.0f} s")
                train.append({"name": name, "exit": rc, "out_dir": str(odir), "records": recs, "wall_s": wall,
                              "tokens": args.train_steps * args.np * 4 * 32, "command": shlex.join(cmd)})

    return report(args, ["hvdllm", "bench", "aggregation", *argv], runs, train, commands, failed,
                  time.perf_counter() - t_all, load_start, os.getloadavg())


def report(args, argv, runs, train, commands, failed, wall_s, load_start, load_end) -> int:
    """Tables, goals, JSON and plot from the worker results and training runs."""
    from hvdllm import config as config_mod
    from hvdllm.params import count
    out = Path(args.out)
    # ---- tables
    main_runs = [r for r in runs if "bandwidth" in r.get("sections", [])]
    bw = [row for r in main_runs for row in bandwidth_rows(r)]
    cmp_ = [row for r in main_runs for row in compression_rows(r)]
    zr = zero_rows(runs)
    prof = [row for r in runs if r.get("setting") for row in profile_rows(r, r["setting"])]
    tables = {}
    _section(f"1. allreduce bus bandwidth, np={args.np}: hvdllm Collectives.allreduce vs mpi4py Allreduce "
             f"on the same buffers (median of reps; GB/s = 1e9 B/s; bound = p2p Sendrecv bandwidth)")
    if bw:
        tables["bandwidth"] = common.print_table(bw, BW_TABLE)
    _section("2. compression: Collectives.allreduce(op=sum, compression=...) time and speed-up over none "
             "(err: max |x - exact| / max |exact|)")
    if cmp_:
        tables["compression"] = common.print_table(cmp_, CMP_TABLE, CMP_LIMITS)
    _section("3. ZeRO-1 vs plain DP: optimizer state per rank and step time (interleaved, slowest rank, median)")
    if zr:
        tables["zero"] = common.print_table(zr, ZERO_TABLE)
    _section(f"4. communication per optimizer step per rank (np={args.np}; est. from the measured hvdllm "
             f"allreduce time, {args.backends[0]})")
    base_bw = [r for r in bw if r["backend"] == args.backends[0]]
    cfg_t = config_mod.Config()
    for kv in TRAIN_SETS:
        k, v = kv.split("=")
        if k.startswith("model."):
            setattr(cfg_t.model, k[6:], int(v))
    cfg_t.model.vocab_size = 256  # byte tokenizer
    comm = comm_rows(count(cfg_t.model), "train: 2x32", args.np, args.localsgd_h, base_bw) + \
        comm_rows(count(zero_config(args.zero_model, 0, 0).model),
                  f"{args.zero_model}: {ZERO_MODELS[args.zero_model][0]}x{ZERO_MODELS[args.zero_model][1]}",
                  args.np, args.localsgd_h, base_bw)
    tables["communication"] = common.print_table(comm, COMM_TABLE)
    tr = train_rows(train)
    if tr:
        print(f"\nloss at equal tokens ({args.train_backend}, np={args.np}, {args.train_steps} steps x "
              f"{args.np} ranks x 4 x 32 tokens; val loss on the held-out split after the final average):")
        tables["training"] = common.print_table(tr, TRAIN_TABLE)
    if prof:
        _section("5. profile of large allreduces (ms, medians; tl = Horovod timeline on rank 0; "
                 "outside tl = call time not inside NEGOTIATE+ALLREDUCE)")
        tables["profile"] = common.print_table(prof, PROFILE_TABLE)
    goals = goal_rows(bw, zr)
    if goals:
        _section("goals")
        tables["goals"] = common.print_table(goals, GOAL_TABLE)
    print(f"\n{TAG} load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end "
          f"({cores()} cores); wall {wall_s:.0f} s", file=sys.stderr)

    result = {
        "benchmark": "aggregation", "argv": argv, "np": args.np,
        "backends": args.backends, "sizes": args.sizes, "reps": args.reps, "warmup": args.warmup,
        "definitions": {
            "algbw": "bytes / median time of one allreduce (slowest rank, after a barrier), 1e9 B/s",
            "busbw": "algbw * 2(n-1)/n (nccl-tests)",
            "p2p_bw": "bytes / median time of comm.Sendrecv(bytes to rank+1, bytes from rank-1): per-"
                      "direction bandwidth of a bidirectional exchange, the ring-allreduce bound on busbw",
            "ratio": "hvdllm busbw / mpi4py busbw = mpi4py time / hvdllm time, same job, interleaved",
            "numpy path": "NumpyCollectives.allreduce (numpy in and out, conversions included)",
            "wire bytes": "bytes sent per rank: 2(n-1)/n * N * itemsize for a ring allreduce; "
                          "(n-1) * 2 * N for bf16 (allgather of 16-bit patterns)",
        },
        "goals_target": GOALS, "commands": commands, "runs": runs, "failed": failed,
        "bandwidth": bw, "compression": cmp_, "zero": zr, "communication": comm, "training": tr,
        "train_runs": train, "profile": prof, "goals": goals, "tables": tables,
        "loadavg_start": load_start, "loadavg_end": load_end, "cores": cores(),
        "wall_s": wall_s,
    }
    path = common.write_json(out, result)
    common.say(f"\n{TAG}", f"wrote {path}")
    if bw and not args.no_plot:
        png = plot(bw, prof, out.with_suffix(".png"),
                   f"allreduce busbw, np={args.np}, float32 sum, {cores()}-core host (shared memory)")
        if png:
            common.say(TAG, f"wrote {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
