"""`hvdllm bench tensor`: tensor-parallel (Megatron-LM) transformer blocks -- the collectives and
bytes each block moves against theory, and the step time at tp=N against the same block unsplit.

    hvdllm bench tensor [--np 2] [--model wide] [--width 1024[,2048]] [--seq T] [--batch B]
                        [--layers 1] [--steps N] [--warmup W] [--backends torch[,tensorflow]]
                        [--repeats R] [--out runs/bench/tensor.json]

For each backend (and each of --repeats) this launches
    mpirun -np N ... python -m hvdllm.bench.tensor_worker --backend B ...
which, for every width, times forward + backward of a stack of --layers GPT blocks (the
backend's own model code, as `parallel.tp` trains it) in three variants, interleaved in rounds:
    tp<N>          split over all N ranks (the tp group), every allreduce counted, sized, timed
    tp<N>-compute  the same split with the collectives skipped: its arithmetic alone
    solo           rank 0 alone runs the unsplit blocks while the others sleep in a non-blocking
                   barrier: np=1, measured in the same job, so drift between launches cannot bias
                   the speed-up
It prints the command, two tables and the goals, and writes JSON (+ a PNG) to --out.

Theory, per block and per step (Megatron-LM; B batch, T sequence, C width, fp32):
    allreduces     2 forward (after the row-parallel attention and MLP projections, g)
                   + 2 backward (gradient of the column-parallel inputs, f)
    payload        each allreduce sums one (B, T, C) activation: 4 x B*T*C x 4 bytes per block
    ring traffic   a ring allreduce of S bytes sends (and receives) 2(N-1)/N x S per rank
    parameters     12C^2 + 7C split N ways, 6C (layer norms, row biases) on every rank

Definitions (medians over the timed steps; a step's time is its slowest rank's):
    ms/block       step time / --layers
    speed-up       t(solo) / t(tp<N>)        efficiency = speed-up / N
    compute s-up   t(solo) / t(tp<N>-compute): how well the split arithmetic alone scales
    comm share     time inside the allreduce calls / t(tp<N>), per rank, averaged over ranks
                   (torch only: includes waiting for the slower rank); and, both backends,
                   1 - t(tp<N>-compute) / t(tp<N>)
    busbw          ring traffic per rank / time inside the allreduce calls (GB/s, 1e9 B/s)
    check          max |tp - unsplit| / max |unsplit| over the blocks' output and input gradient
Counts and bytes come from a count pass (one step) with the library's TPGroup subclassed in the
worker; the ring traffic is derived from the measured payload (MPI exposes no wire counters).
A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.tensor_worker import MODELS
from hvdllm.runtime import cores

TAG = "[bench tensor]"
DEFAULT_MODEL = "wide"
MB = 1e6
CHECK_TOL = 1e-4  # fp32: the split sums partial products in another order


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench tensor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2, help="ranks = tensor-parallel degree (default 2)")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"block size preset (default {DEFAULT_MODEL}); "
                        + "; ".join(f"{k}: C={v[0]}, {v[1]} heads, T={v[2]}, batch {v[3]}"
                                    for k, v in MODELS.items()))
    p.add_argument("--width", default="", help="comma list of widths C (default: the model's); "
                                               "heads keep the model's head size")
    p.add_argument("--heads", default="", help="comma list of head counts, one per width")
    p.add_argument("--seq", type=int, default=0, help="sequence length T (0: the model's)")
    p.add_argument("--batch", type=int, default=0, help="sequences B (0: the model's)")
    p.add_argument("--layers", type=int, default=1, help="transformer blocks in the timed stack")
    common.add_timing_options(p, steps=10, warmup=2)
    p.add_argument("--backends", default="torch", help="comma list: torch,tensorflow")
    p.add_argument("--repeats", type=int, default=1,
                   help="launch each backend this many times and pool the step times")
    common.add_env_option(p)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each launch wait up to this long for the machine to be idle")
    common.add_output_options(p, "tensor")
    a = p.parse_args(argv)
    C, H, T, B = MODELS[a.model]
    a.widths = _ints(a.width) or [C]
    a.seq, a.batch = a.seq or T, a.batch or B
    a.heads = _ints(a.heads) or [max(a.np, w // (C // H)) for w in a.widths]
    a.backends = common.backend_list(p, a.backends)
    if a.np < 2:
        p.error("--np: tensor parallelism needs at least 2 ranks (np=1 is measured inside the job)")
    if len(a.heads) != len(a.widths):
        p.error(f"--heads: {len(a.heads)} values for {len(a.widths)} widths")
    for w, h in zip(a.widths, a.heads):
        if h % a.np or w % h:
            p.error(f"width {w} with {h} heads: --np {a.np} must divide the heads, the heads the width")
    if min(a.steps, a.repeats, a.seq, a.batch, a.layers) < 1 or a.warmup < 0:
        p.error("--steps, --repeats, --seq, --batch and --layers must be >= 1, --warmup >= 0")
    return a


def worker_command(args, backend: str, out: str) -> list[str]:
    """The exact mpirun argv of one worker launch."""
    return common.worker_command("hvdllm.bench.tensor_worker", args.np, [
        "--backend", backend, "--widths", ",".join(map(str, args.widths)),
        "--heads", ",".join(map(str, args.heads)), "--seq", args.seq, "--batch", args.batch,
        "--layers", args.layers, "--steps", args.steps, "--warmup", args.warmup,
        "--per-round", args.per_round, "--threads", 1, "--out", out], args.env)


# ---------------------------------------------------------------------------------------------
# theory and analysis (pure functions of the worker's raw JSON)

def theory(B: int, T: int, C: int, tp: int, itemsize: int = 4) -> dict:
    """Megatron-LM's communication and parameter split of one block (see the module docstring)."""
    payload = 4 * B * T * C * itemsize
    return {"allreduces_forward": 2, "allreduces_backward": 2, "elements_per_allreduce": B * T * C,
            "payload_bytes": payload, "ring_bytes_per_rank": 2 * (tp - 1) / tp * payload,
            "param_bytes_unsplit": (12 * C * C + 13 * C) * itemsize,
            "param_bytes_per_rank": ((12 * C * C + 7 * C) / tp + 6 * C) * itemsize}


def measured_comm(calls: list, layers: int) -> dict:
    """Per block, from one rank's recorded allreduces of one step: counts per direction, payload
    bytes, and the distinct message sizes (elements)."""
    fwd = sum(c[0] == "forward" for c in calls)
    bwd = sum(c[0] == "backward" for c in calls)
    return {"allreduces_forward": fwd / layers, "allreduces_backward": bwd / layers,
            "payload_bytes": sum(c[2] for c in calls) / layers,
            "message_elements": sorted({c[1] for c in calls})}


def pool(runs: list[dict]) -> dict:
    """{(backend, width): pooled figures} over repeated launches: step times per variant and each
    rank's allreduce seconds per step concatenated; the count pass of every launch kept."""
    by: dict = {}
    for run in runs:
        for w in run["widths"]:
            key = (run["backend"], w["width"])
            m = by.setdefault(key, {"backend": run["backend"], "np": run["np"], "width": w["width"],
                                    "heads": w["heads"], "layers": run["layers"], "seq": run["seq"],
                                    "batch": run["batch"], "times": {}, "comm": None, "calls": [],
                                    "checks": [], "param_bytes": {}})
            for name, v in w["variants"].items():
                m["times"].setdefault(name, []).extend(v["step_times_s"])
                m["param_bytes"][name] = v["param_bytes_per_rank"]
            if w["comm_s_per_rank"] is not None:
                m["comm"] = [a + b for a, b in zip(m["comm"] or [[] for _ in w["comm_s_per_rank"]],
                                                   w["comm_s_per_rank"])]
            m["calls"].append(w["calls_per_rank"])
            m["checks"].append(w["check"])
    return by


def _ratio(a, b):
    return a / b if a is not None and b else None


def analyse(m: dict) -> dict:
    """One table row (every figure) for one (backend, width)."""
    n, L, C = m["np"], m["layers"], m["width"]
    tp, comp = f"tp{n}", f"tp{n}-compute"
    th = theory(m["batch"], m["seq"], C, n)
    counted = [measured_comm(rank_calls[tp], L) for launch in m["calls"] for rank_calls in launch]
    meas = counted[0]
    same = all(c == meas for c in counted)  # every rank, every launch: the same collectives
    t = {name: common.summarize(ts) for name, ts in m["times"].items()}
    t_solo, t_tp, t_comp = t["solo"]["median_s"], t[tp]["median_s"], t[comp]["median_s"]
    comm_step = statistics.mean(statistics.median(c) for c in m["comm"]) if m["comm"] else None
    ring = 2 * (n - 1) / n * meas["payload_bytes"] * L  # per step
    checks = [max(c.values()) for c in m["checks"] if c]
    pb_tp, pb_solo = max(m["param_bytes"][tp]), m["param_bytes"]["solo"][0]
    speedup = _ratio(t_solo, t_tp)
    return {
        "backend": m["backend"], "np": n, "width": C, "heads": m["heads"], "tokens": m["batch"] * m["seq"],
        "layers": L, "ar_forward": meas["allreduces_forward"], "ar_backward": meas["allreduces_backward"],
        "ar": f"{meas['allreduces_forward']:g}+{meas['allreduces_backward']:g}",
        "ar_ratio": (meas["allreduces_forward"] + meas["allreduces_backward"]) / 4,
        "same_on_every_rank": same, "message_elements": meas["message_elements"],
        "elements_theory": th["elements_per_allreduce"],
        "payload_mb": meas["payload_bytes"] / MB, "payload_mb_theory": th["payload_bytes"] / MB,
        "bytes_ratio": meas["payload_bytes"] / th["payload_bytes"],
        "ring_mb_per_rank": 2 * (n - 1) / n * meas["payload_bytes"] / MB,
        "ar_ms_per_block": comm_step / L * 1e3 if comm_step is not None else None,
        "busbw_gbs": ring / comm_step / 1e9 if comm_step else None,
        "solo_ms": t_solo / L * 1e3, "tp_ms": t_tp / L * 1e3, "compute_ms": t_comp / L * 1e3,
        "solo_iqr_ms": [t["solo"]["p25_s"] / L * 1e3, t["solo"]["p75_s"] / L * 1e3],
        "tp_iqr_ms": [t[tp]["p25_s"] / L * 1e3, t[tp]["p75_s"] / L * 1e3],
        "speedup": speedup, "efficiency": speedup / n if speedup else None,
        "compute_speedup": _ratio(t_solo, t_comp),
        "comm_share_calls": comm_step / t_tp if comm_step is not None else None,
        "comm_share_sub": 1 - t_comp / t_tp,
        "param_mb_rank": pb_tp / MB, "param_mb_solo": pb_solo / MB,
        "param_frac": pb_tp / pb_solo, "param_frac_theory": th["param_bytes_per_rank"] / th["param_bytes_unsplit"],
        "check_rel_diff": max(checks) if checks else None,
        "check": _show(max(checks)) if checks else "-",
        "steps": {name: s["n"] for name, s in t.items()}, "theory": th,
    }


TABLE_COMM = [("backend", "backend"), ("width", "C"), ("tokens", "B*T"),
              ("ar", "allreduces/block fwd+bwd"), ("ar_ratio", "vs 2+2"),
              ("payload_mb", "payload MB/block"), ("payload_mb_theory", "theory 4*B*T*C*4"),
              ("bytes_ratio", "ratio"), ("ring_mb_per_rank", "ring MB sent/rank"),
              ("ar_ms_per_block", "allreduce ms/block"), ("busbw_gbs", "busbw GB/s")]
TABLE_SPEED = [("backend", "backend"), ("width", "C"), ("solo_ms", "np=1 ms/block"),
               ("tp_ms", "tp ms/block"), ("compute_ms", "tp compute-only ms"), ("speedup", "speed-up"),
               ("efficiency", "efficiency"), ("compute_speedup", "compute s-up"),
               ("comm_share_calls", "comm share (calls)"), ("comm_share_sub", "comm share (tp-compute)"),
               ("param_mb_rank", "param MB/rank"), ("param_mb_solo", "np=1 param MB"),
               ("param_frac", "frac"), ("check", "check")]
GOAL_TABLE = [("backend", "backend"), ("goal", "goal"), ("value", "value"), ("target", "target"), ("met", "met")]
# a speed-up over one rank cannot exceed the rank count, nor the efficiency 1
SPEED_LIMITS = {"speedup": lambda r: r["np"], "compute_speedup": lambda r: r["np"], "efficiency": 1.0}


def goals(rows: list[dict]) -> list[dict]:
    """Counts and bytes must match theory exactly and the split must compute the same function;
    the split should pay (speed-up > 1) at the widest width measured."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        out.append({"backend": backend, "goal": "allreduces per block / (2+2)", "value": _worst(mine, "ar_ratio"),
                    "target": "= 1.00", "met": _yes(all(r["ar_ratio"] == 1 and r["same_on_every_rank"]
                                                        for r in mine))})
        out.append({"backend": backend, "goal": "payload bytes per block / (4*B*T*C*4)",
                    "value": _worst(mine, "bytes_ratio"), "target": "= 1.00",
                    "met": _yes(all(r["bytes_ratio"] == 1 for r in mine))})
        diff = max((r["check_rel_diff"] for r in mine if r["check_rel_diff"] is not None), default=None)
        out.append({"backend": backend, "goal": "tp output and input grad vs unsplit (rel diff)", "value": diff,
                    "target": f"<= {CHECK_TOL:g}", "met": _yes(diff is not None and diff <= CHECK_TOL)})
        wide = max(mine, key=lambda r: r["width"])
        out.append({"backend": backend, "goal": f"speed-up tp={wide['np']} vs np=1 at C={wide['width']}",
                    "value": wide["speedup"], "target": "> 1.00", "met": _yes((wide["speedup"] or 0) > 1)})
    return out


def _worst(rows: list[dict], key: str) -> float:
    """The value of `key` farthest from 1 (a ratio that should be exactly 1)."""
    return max((r[key] for r in rows), key=lambda v: abs(v - 1))


def _show(v):
    """Small values (the numerical check) in scientific notation; the rest as the tables do."""
    return f"{v:.1e}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else v


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


# ---------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = common.pyplot(TAG)
    if plt is None:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    labels = [f"{r['backend']}\nC={r['width']}" for r in rows]
    bars = (("solo_ms", "np=1 (unsplit)", "tab:gray"), ("tp_ms", "tp (split + allreduces)", "tab:blue"),
            ("compute_ms", "tp compute-only", "tab:cyan"))
    w = 0.8 / len(bars)
    for k, (key, label, color) in enumerate(bars):
        xs = [i + (k - 1) * w for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], w, label=label, color=color)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("forward+backward ms per block (median)")
    ax.legend(fontsize=8)
    ax.set_title("step time per block", fontsize=9)
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        bx.plot([r["width"] for r in mine], [r["speedup"] for r in mine], "o-", label=f"{backend}: speed-up")
        bx.plot([r["width"] for r in mine], [r["compute_speedup"] for r in mine], "s--", mfc="none",
                label=f"{backend}: compute-only speed-up")
    n = rows[0]["np"]
    bx.axhline(n, color="k", lw=1, label=f"ideal ({n})")
    bx.axhline(1, color="k", lw=1, ls=":", label="break-even")
    bx.set_xscale("log", base=2)
    widths = sorted({r["width"] for r in rows})
    bx.set_xticks(widths, [str(w) for w in widths])
    bx.set_xlabel("width C")
    bx.set_ylabel("t(np=1) / t(tp)")
    bx.set_ylim(bottom=0)
    bx.legend(fontsize=8)
    bx.set_title("tp speed-up over the unsplit block", fontsize=9)
    fig.suptitle(title, fontsize=9)
    return common.save_figure(plt, fig, path)


def _say(msg: str) -> None:
    common.say(TAG, msg)


def run_launches(args, tmp: str) -> tuple[list[dict], list[list[str]], list[dict]]:
    """Every worker launch, in order: (raw results, commands, failures)."""
    plan = [b for b in args.backends for _ in range(args.repeats)]
    runs, commands, failed = [], [], []
    for i, backend in enumerate(plan, 1):
        part = str(Path(tmp) / f"{i:02d}-{backend}.json")
        cmd = worker_command(args, backend, part)
        commands.append(cmd)
        run, rc, wall = common.run_worker(cmd, part, args.timeout, TAG,
                                          f"({i}/{len(plan)}) {backend} np={args.np}, widths {args.widths}",
                                          args.wait_quiet)
        if run is None:
            failed.append({"backend": backend, "exit": rc, "command": shlex.join(cmd)})
            continue
        run["command"], run["wall_s"] = shlex.join(cmd), wall
        runs.append(run)
        common.warn_if_busy(TAG, run.get("foreign_cpu_cores"))
    return runs, commands, failed


def main(argv=None) -> int:
    argv = list(argv or [])
    args = parse(argv)
    out = Path(args.out)
    t_all = time.perf_counter()
    if args.np > cores():
        _say(f"note: {args.np} ranks on {cores()} cores oversubscribes the machine; the speed-up then "
             f"measures time-sharing")
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-tensor-") as tmp:
        runs, commands, failed = run_launches(args, tmp)
    rows = [analyse(m) for m in pool(runs).values()]
    gl = goals(rows) if rows else []
    title = (f"hvdllm bench tensor: tp={args.np} vs np=1, {args.layers} GPT block(s), B={args.batch}, "
             f"T={args.seq}, fp32, 1 thread/rank, median of {args.steps * args.repeats} steps")
    print(f"\n{title}")
    if rows:
        print("\ncommunication per block (forward + backward) against theory:")
        common.print_table(rows, TABLE_COMM)
        print(f"\ntp={args.np} against the unsplit block (np=1, rank 0 alone inside the same job):")
        common.print_table(rows, TABLE_SPEED, SPEED_LIMITS)
        print()
        common.print_table([{**g, "value": _show(g["value"])} for g in gl], GOAL_TABLE,
                           {"value": lambda g: args.np if g["goal"].startswith("speed-up") else None})
    files = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows and not args.no_plot:
        png = plot(rows, out.with_suffix(".png"), title)
        if png:
            files["png"] = str(png)
    result = {
        "benchmark": "tensor", "argv": ["hvdllm", "bench", "tensor", *argv],
        "command": shlex.join(commands[0]) if commands else None,
        "commands": [shlex.join(c) for c in commands],
        "np": args.np, "tp": args.np, "backends": args.backends, "model": args.model,
        "model_config": {"widths": args.widths, "heads": args.heads, "block_size": args.seq,
                         "batch": args.batch, "n_layer": args.layers},
        "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round, "repeats": args.repeats,
        "threads_per_rank": 1, "env": args.env,
        "definitions": {
            "ms_per_block": "median over the timed steps of the slowest rank's forward+backward time / layers",
            "speedup": "t(solo: unsplit, rank 0 alone in the same job) / t(tp)",
            "efficiency": "speedup / np",
            "compute_speedup": "t(solo) / t(tp with the collectives skipped)",
            "comm_share_calls": "seconds inside the allreduce calls per step / t(tp), averaged over ranks "
                                "(torch only; includes waiting for the slower rank)",
            "comm_share_sub": "1 - t(tp compute-only) / t(tp)",
            "payload": "bytes of the tensors handed to the allreduces of one block, forward+backward; "
                       "theory 4 allreduces x B*T*C x 4 bytes",
            "ring_mb_per_rank": "2(np-1)/np x measured payload: what a ring allreduce sends per rank",
            "busbw_gbs": "ring bytes per rank / seconds inside the allreduce calls (1e9 B/s)",
            "param_frac": "parameter bytes per rank under tp / unsplit; theory ((12C^2+7C)/np + 6C)/(12C^2+13C)",
            "check_rel_diff": "max |tp - unsplit| / max |unsplit| of the blocks' output and input gradient",
            "MB": "1e6 bytes",
        },
        "rows": rows, "goals": gl, "runs": runs, "failed": failed, "files": files,
        "cores": cores(), "oversubscribed": args.np > cores(),
        "foreign_cpu_cores": [r.get("foreign_cpu_cores") for r in runs],
        "wall_s": time.perf_counter() - t_all,
    }
    path = common.write_json(out, result)
    _say(f"wrote {path}")
    for f in files.values():
        _say(f"wrote {f}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
