"""`hvdllm bench pipeline`: pipeline efficiency of the real executor against the ideal
1 - (p-1)/(m+p-1), peak activation memory GPipe vs 1F1B, and a timeline of one step.

    hvdllm bench pipeline [--pp 2] [--m 1,2,4,8,16] [--schedules gpipe,1f1b] [--steps N]
                          [--backend torch] [--model small] [--out runs/bench/pipeline.json]

Launches `mpirun -np PP ... python -m hvdllm.bench.pipeline_worker` once (see that file for
how it measures), then prints a table, the goal, and writes next to --out:
    pipeline.json                  every figure below, per step and per rank
    pipeline.png                   efficiency vs m with the ideal curve; peak activation memory vs m
    pipeline_timeline.png          Gantt chart per stage of one measured step and of the simulator
    pipeline_<schedule>_trace.json Chrome trace (chrome://tracing, ui.perfetto.dev) of one step:
                                   process "measured" (one thread per rank, every instruction,
                                   rank 0's train_step start = 0) and process "simulator"
    pipeline_<schedule>_sim_trace.json the simulator's trace alone
    pipeline_raw.json              the worker's raw output (every step, rank and instruction)

Definitions (per timed step; the table shows medians over the timed steps):
    busy_s      forward + backward time of stage s, summed from the executor's instruction trace
    step        wall time of one train_step: latest rank's end - earliest rank's start (one
                clock per host; a barrier precedes every step)
    eff (step)  sum_s busy_s / (p * step)   = 1 - measured idle fraction over the whole step,
                everything counted: bubbles, message waits, stage imbalance, Python overhead,
                the optimizer step and the loss broadcast
    eff (pipe)  sum_s busy_s / (p * pipe)   where pipe runs from the first instruction to the last
                forward/backward on any stage: the schedule's own efficiency, the quantity the
                simulator and the ideal formula describe (no optimizer step, no loss broadcast)
    ideal       1 - ideal_bubble(p, m) = 1 - (p-1)/(m+p-1), the same quantity for a perfect
                pipeline (equal stages, free messages, no optimizer step)
    frac        eff / ideal. Goal: frac >= 0.9 at m >= 4p (checked on eff (step), the strict one)
    in-flight   peak number of micro-batches forwarded but not yet backwarded on each stage,
                counted from the measured trace; the simulator's peak_inflight beside it
    act MB      peak bytes autograd saved for backward (+ the kept stage output) per stage,
                measured with saved_tensors_hooks (see pipeline_worker.MemoryProbe)
    held MB     the same plus the send buffers the executor keeps until reduce_grads
A second table splits each rank's step into its instructions (compute, blocked in recv, isend
posting, reduce_grads = waiting for the posted sends, step = tied-embedding exchange + norm
allreduce + AdamW, before/between/after the instructions) and `msg latency`: per step, the sum
over blocking receives of the time from the matching isend being posted (or the receive starting,
if later) to the receive returning -- delivery plus the receiver's wake-up delay.
The micro-batch size is fixed, so the batch grows with m and work per micro-batch is constant.
On a shared machine, compute stretched by other processes counts as busy, so a noisy run can
show eff above the ideal; the warning line reports how many cores other processes kept busy.
Every intermediate (per step, per rank, per instruction) is kept in <out stem>_raw.json;
`--from-raw` re-analyses it without running anything.
A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import textwrap
import time
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.common import MB
from hvdllm.runtime import cores
from hvdllm.strategies import schedules as sched

GOAL = 0.9  # fraction of the ideal efficiency, at m >= GOAL_M_PER_P * p
GOAL_M_PER_P = 4
TAG = "[bench pipeline]"
COMPUTE = ("forward", "backward")
WAITS = ("recv_act", "recv_grad")
SENDS = ("send_act", "send_grad")


def parse(argv):
    from hvdllm.bench.pipeline_worker import MODELS
    p = argparse.ArgumentParser(prog="hvdllm bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2, help="pipeline stages = ranks (default 2; more than "
                                                      "the machine's cores oversubscribes it)")
    p.add_argument("--m", default="1,2,4,8,16", help="comma list of micro-batch counts")
    p.add_argument("--schedules", default="gpipe,1f1b", help="comma list: gpipe,1f1b")
    common.add_timing_options(p, steps=20, warmup=2)  # a variant: one (schedule, m)
    p.add_argument("--backend", default="torch", help="only torch has a pipeline engine")
    p.add_argument("--model", default="small", choices=list(MODELS),
                   help="; ".join(f"{k}: {v[0]} blocks (rounded up to a multiple of pp) x {v[1]}, "
                                  f"{v[2]} heads, T={v[3]}, {v[5]} sequences/micro-batch"
                                  for k, v in MODELS.items()))
    p.add_argument("--microbatch", type=int, default=0, help="sequences per micro-batch (0: the model's)")
    p.add_argument("--trace-m", type=int, default=0,
                   help=f"m of the timeline/trace (0: {GOAL_M_PER_P}*pp if measured, else the largest)")
    common.add_output_options(p, "pipeline", timeout=1800)
    p.add_argument("--from-raw", metavar="RAW_JSON",
                   help="analyse a worker output kept by an earlier run (<out stem>_raw.json) "
                        "instead of launching")
    a = p.parse_args(argv)
    try:
        a.m = sorted({int(v) for v in a.m.split(",") if v.strip()})
    except ValueError:
        p.error(f"--m: expected a comma list of integers, got {a.m!r}")
    a.schedules = [s.strip() for s in a.schedules.split(",") if s.strip()]
    if a.backend != "torch":
        p.error(f"--backend {a.backend}: only the torch backend has a pipeline engine "
                f"(torch_backend/pipeline.py)")
    bad = [s for s in a.schedules if s not in ("gpipe", "1f1b")]
    if bad or not a.schedules:
        p.error(f"--schedules: {bad or a.schedules} not among gpipe, 1f1b (the interleaved schedule "
                f"needs several chunks per stage and is not benchmarked here)")
    if a.pp < 2 or not a.m or min(a.m) < 1 or a.steps < 1 or a.warmup < 0:
        p.error("need --pp >= 2, --m values >= 1, --steps >= 1, --warmup >= 0")
    return a


def worker_command(args, raw: str) -> list[str]:
    """The exact mpirun argv of the worker launch."""
    return common.worker_command("hvdllm.bench.pipeline_worker", args.pp, [
        "--backend", args.backend, "--model", args.model, "--m", ",".join(map(str, args.m)),
        "--schedules", ",".join(args.schedules), "--steps", args.steps, "--warmup", args.warmup,
        "--per-round", args.per_round, "--threads", 1, "--out", raw,
        *(["--microbatch", args.microbatch] if args.microbatch else [])])


# ---------------------------------------------------------------------------------------------
# analysis (pure functions of the worker's raw JSON)

def _dur(trace, ops) -> float:
    return sum(e[1] - e[0] for e in trace if e[2] in ops)


def peak_inflight(trace) -> int:
    """Peak (forwarded - backwarded) micro-batches in one stage's trace."""
    live = peak = 0
    for e in trace:
        if e[2] == "forward":
            live += 1
            peak = max(peak, live)
        elif e[2] == "backward":
            live -= 1
    return peak


def message_latencies(ranks: list[dict]) -> list[list[float]]:
    """Per rank, for each blocking receive: how long after the matching isend was posted (or
    after the receive started, if later) the message was in hand. With one clock per host this
    is delivery + the receiver's wake-up delay (mpi/p2p polls with a growing sleep)."""
    posted = {}
    for r, rr in enumerate(ranks):
        for a, b, op, mb, chunk in rr["trace"]:
            if op == "send_act":
                posted[("act", mb, r + 1)] = b
            elif op == "send_grad":
                posted[("grad", mb, r - 1)] = b
    out = []
    for r, rr in enumerate(ranks):
        lat = []
        for a, b, op, mb, chunk in rr["trace"]:
            t = posted.get((op[5:], mb, r)) if op in WAITS else None
            if t is not None:
                lat.append(max(0.0, b - max(a, t)))
        out.append(lat)
    return out


def step_metrics(ranks: list[dict]) -> dict:
    """Figures of one step from every rank's {t0, t1, trace} (seconds, rank-0 relative)."""
    p = len(ranks)
    t0, t1 = min(r["t0"] for r in ranks), max(r["t1"] for r in ranks)
    step = t1 - t0
    starts = [r["trace"][0][0] for r in ranks if r["trace"]]
    ends = [max(e[1] for e in r["trace"] if e[2] in COMPUTE) for r in ranks
            if any(e[2] in COMPUTE for e in r["trace"])]
    pipe = max(ends) - min(starts) if starts and ends else step
    busy = [_dur(r["trace"], COMPUTE) for r in ranks]
    lats = message_latencies(ranks)
    per_rank = []
    for r, b, lat in zip(ranks, busy, lats):
        tr = r["trace"]
        instr = sum(e[1] - e[0] for e in tr)
        first, last = (tr[0][0], tr[-1][1]) if tr else (r["t0"], r["t0"])
        per_rank.append({
            "compute_s": b, "forward_s": _dur(tr, ("forward",)), "backward_s": _dur(tr, ("backward",)),
            "recv_wait_s": _dur(tr, WAITS), "send_post_s": _dur(tr, SENDS),
            "reduce_grads_s": _dur(tr, ("reduce_grads",)), "optimizer_step_s": _dur(tr, ("step",)),
            "pre_s": first - r["t0"], "gaps_s": (last - first) - instr, "post_s": r["t1"] - last,
            "late_start_s": r["t0"] - t0, "early_end_s": t1 - r["t1"],
            "msg_latency_sum_s": sum(lat), "msg_latency_max_s": max(lat, default=0.0),
            "peak_inflight": peak_inflight(tr)})
    return {"step_s": step, "pipe_s": pipe, "busy_s": busy, "msg_latencies_s": [x for lat in lats for x in lat],
            "eff_step": sum(busy) / (p * step) if step > 0 else 0.0,
            "eff_pipe": sum(busy) / (p * pipe) if pipe > 0 else 0.0, "per_rank": per_rank}


def _med(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _quartiles(values):
    s = common.summarize(values)
    return [s["p25_s"], s["p75_s"]]


def simulated(p: int, m: int, schedule: str, fwd: float, bwd: float):
    """The simulator on this schedule with the measured mean per-stage forward/backward cost."""
    plan = [sched.build(schedule, p, m, s) for s in range(p)]
    return sched.simulate(plan, p, 1, fwd_time=max(fwd, 1e-9), bwd_time=max(bwd, 1e-9), comm_time=0.0,
                          buffered=True)


def analyse_variant(raw: dict, v: dict) -> dict:
    p, m, schedule = raw["p"], v["m"], v["schedule"]
    steps = [step_metrics(st) for st in v["steps"]]
    ideal = 1.0 - sched.ideal_bubble(p, m)
    fb = v["stage_fwd_bwd_s"]
    fwd, bwd = statistics.mean(f for f, _ in fb), statistics.mean(b for _, b in fb)
    sim = simulated(p, m, schedule, fwd, bwd)
    mem = v["memory"]
    order = sorted(range(len(steps)), key=lambda i: steps[i]["step_s"])
    median_step = order[(len(order) - 1) // 2] if order else None
    keys = steps[0]["per_rank"][0].keys() if steps else []
    breakdown = [{k: _med(s["per_rank"][r][k] for s in steps) for k in keys} for r in range(p)]
    eff_step, eff_pipe = _med(s["eff_step"] for s in steps), _med(s["eff_pipe"] for s in steps)
    busy = [_med(s["busy_s"][r] for s in steps) for r in range(p)]
    inflight = [max((s["per_rank"][r]["peak_inflight"] for s in steps), default=0) for r in range(p)]
    return {
        "schedule": schedule, "m": m, "steps": len(steps),
        "step_s": _med(s["step_s"] for s in steps), "pipe_s": _med(s["pipe_s"] for s in steps),
        "step_times_s": [s["step_s"] for s in steps],
        "eff_step": eff_step, "eff_pipe": eff_pipe, "ideal": ideal,
        "eff_step_p25_p75": _quartiles([s["eff_step"] for s in steps]),
        "msg_latency_median_s": _med(x for s in steps for x in s["msg_latencies_s"]),
        "msg_latency_max_s": max((x for s in steps for x in s["msg_latencies_s"]), default=0.0),
        "frac_step": eff_step / ideal, "frac_pipe": eff_pipe / ideal,
        "eff_step_per_step": [s["eff_step"] for s in steps], "eff_pipe_per_step": [s["eff_pipe"] for s in steps],
        "busy_s": busy, "imbalance": max(busy) / statistics.mean(busy) if busy and min(busy) > 0 else None,
        "stage_fwd_bwd_s": fb, "breakdown_per_rank": breakdown,
        "peak_inflight": inflight, "sim_peak_inflight": sim.peak_inflight,
        "sim_makespan_s": sim.makespan, "sim_eff": 1.0 - sim.bubble,
        "peak_act_bytes": [x["peak_saved_bytes"] for x in mem],
        "peak_held_bytes": [x["peak_held_bytes"] for x in mem],
        "probe_peak_inflight": [x["peak_inflight"] for x in mem],
        "saved_bytes_per_mb": [statistics.mean(x["saved_bytes_per_mb"]) if x["saved_bytes_per_mb"] else 0
                               for x in mem],
        "send_buffer_bytes": [x["send_bytes"] for x in mem],
        "memory_curve": [x["curve"] for x in mem],
        "median_step_index": median_step,
    }


def _slash(values, f="{:d}") -> str:
    return "/".join(f.format(x) for x in values)


def table_rows(variants: list[dict]) -> list[dict]:
    rows = []
    for a in variants:
        rows.append({
            "schedule": a["schedule"], "m": a["m"], "step_s": a["step_s"], "eff_step": a["eff_step"],
            "eff_pipe": a["eff_pipe"], "ideal": a["ideal"], "frac_step": a["frac_step"],
            "frac_pipe": a["frac_pipe"],
            "inflight": f"{_slash(a['peak_inflight'])} ({_slash(a['sim_peak_inflight'])})",
            "act_mb": _slash([b / MB for b in a["peak_act_bytes"]], "{:.1f}"),
            "held_mb": _slash([b / MB for b in a["peak_held_bytes"]], "{:.1f}"),
        })
    return rows


# busy time over p x wall cannot exceed 1: a value above it is flagged in the table
EFF_LIMITS = {"eff_step": 1.0, "eff_pipe": 1.0}
TABLE = [("schedule", "schedule"), ("m", "m"), ("step_s", "step s"), ("eff_step", "eff (step)"),
         ("eff_pipe", "eff (pipe)"), ("ideal", "ideal"), ("frac_step", "frac of ideal (step)"),
         ("frac_pipe", "frac (pipe)"), ("inflight", "peak in-flight mb/stage (sim)"),
         ("act_mb", "peak act MB/stage"), ("held_mb", "+send bufs MB/stage")]
BREAKDOWN = [("schedule", "schedule"), ("m", "m"), ("rank", "rank"), ("step_s", "step"),
             ("fwd_s", "F/mb"), ("bwd_s", "B/mb"), ("compute_s", "compute"),
             ("recv_wait_s", "recv wait"), ("send_post_s", "isend"), ("reduce_grads_s", "drain sends"),
             ("optimizer_step_s", "opt step"), ("pre_s", "pre"), ("gaps_s", "gaps"), ("post_s", "post"),
             ("late_start_s", "late start"), ("msg_latency_sum_s", "msg latency")]


def breakdown_rows(variants: list[dict]) -> list[dict]:
    rows = []
    for a in variants:
        for r, b in enumerate(a["breakdown_per_rank"]):
            f, bw = a["stage_fwd_bwd_s"][r]
            rows.append({"schedule": a["schedule"], "m": a["m"], "rank": r, "step_s": a["step_s"],
                         "fwd_s": f, "bwd_s": bw,
                         **{k: b[k] for k in ("compute_s", "recv_wait_s", "send_post_s",
                                                    "reduce_grads_s", "optimizer_step_s", "pre_s",
                                                    "gaps_s", "post_s", "late_start_s",
                                                    "msg_latency_sum_s")}})
    return rows


def goals(variants: list[dict], p: int) -> list[dict]:
    out = []
    for schedule in dict.fromkeys(a["schedule"] for a in variants):
        big = [a for a in variants if a["schedule"] == schedule and a["m"] >= GOAL_M_PER_P * p]
        for kind in ("step", "pipe"):
            if not big:
                out.append({"schedule": schedule, "measure": f"frac of ideal ({kind})",
                            "at": f"m >= {GOAL_M_PER_P * p}", "worst": None, "target": GOAL,
                            "met": "not measured"})
                continue
            worst = min(big, key=lambda a: a[f"frac_{kind}"])
            out.append({"schedule": schedule, "measure": f"frac of ideal ({kind})",
                        "at": f"m >= {GOAL_M_PER_P * p}", "worst": worst[f"frac_{kind}"],
                        "worst_m": worst["m"], "target": GOAL,
                        "met": "yes" if worst[f"frac_{kind}"] >= GOAL else "NO"})
    return out


# ---------------------------------------------------------------------------------------------
# traces

def _name(op: str, mb: int) -> str:
    if op in COMPUTE:
        return f"{op[0].upper()}{mb}"
    if op == "reduce_grads":
        return "reduce_grads (wait for posted sends)"
    if op == "step":
        return "step (tied wte, grad norm, AdamW)"
    return f"{op.replace('_', ' ')} {mb}"


def chrome_trace(ranks: list[dict], sim, title: str) -> dict:
    """One measured step (pid 0, thread per rank) and the simulator's (pid 1), in microseconds."""
    us = 1e6
    ev = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"measured: {title}"}},
          {"name": "process_name", "ph": "M", "pid": 1,
           "args": {"name": "simulator (measured mean F/B per stage, free messages)"}}]
    for r, rr in enumerate(ranks):
        ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"stage {r} (rank {r})"}})
        ev.append({"name": "train_step", "cat": "step", "ph": "X", "pid": 0, "tid": r, "ts": rr["t0"] * us,
                   "dur": (rr["t1"] - rr["t0"]) * us})
        for a, b, op, mb, chunk in rr["trace"]:
            cat = "compute" if op in COMPUTE else "wait" if op in WAITS else op
            ev.append({"name": _name(op, mb), "cat": cat, "ph": "X", "pid": 0, "tid": r, "ts": a * us,
                       "dur": (b - a) * us, "args": {"op": op, "mb": mb, "chunk": chunk}})
    if sim is not None:
        for e in sched.to_chrome_trace(sim, us_per_unit=us)["traceEvents"]:
            ev.append(dict(e, pid=1))
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def sim_trace(sim) -> dict:
    return sched.to_chrome_trace(sim, us_per_unit=1e6)


# ---------------------------------------------------------------------------------------------
# plots

_COLORS = {"forward": "tab:blue", "backward": "tab:green", "recv_act": "0.8", "recv_grad": "0.8",
           "send_act": "black", "send_grad": "black", "reduce_grads": "gold", "step": "tab:red"}


def plot_efficiency(variants: list[dict], p: int, path: Path, title: str) -> Path | None:
    plt = common.pyplot(TAG)
    if plt is None:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    ms = sorted({a["m"] for a in variants})
    grid = [1 + i * (max(ms) - 1) / 200 for i in range(201)] if max(ms) > 1 else [1]
    ideal = [1 - (p - 1) / (x + p - 1) for x in grid]
    ax.plot(grid, ideal, "k-", lw=1.5, label="ideal 1-(p-1)/(m+p-1)")
    ax.plot(grid, [GOAL * y for y in ideal], "k:", lw=1, label=f"{GOAL} x ideal (goal at m >= {GOAL_M_PER_P}p)")
    ax.axvspan(GOAL_M_PER_P * p, max(max(ms), GOAL_M_PER_P * p), color="0.93", zorder=0)
    colors = {"gpipe": "tab:orange", "1f1b": "tab:blue"}
    for schedule in dict.fromkeys(a["schedule"] for a in variants):
        rows = sorted((a for a in variants if a["schedule"] == schedule), key=lambda a: a["m"])
        c = colors.get(schedule, "tab:gray")
        ax.errorbar([a["m"] for a in rows], [a["eff_step"] for a in rows],
                    yerr=[[a["eff_step"] - a["eff_step_p25_p75"][0] for a in rows],
                          [a["eff_step_p25_p75"][1] - a["eff_step"] for a in rows]],
                    fmt="o-", color=c, capsize=3, label=f"{schedule}: measured, whole step (p25-p75)")
        ax.plot([a["m"] for a in rows], [a["eff_pipe"] for a in rows], "s--", color=c, mfc="none",
                label=f"{schedule}: measured, schedule span")
        bx.plot([a["m"] for a in rows], [max(a["peak_act_bytes"]) / MB for a in rows], "o-", color=c,
                label=f"{schedule}: saved activations")
        bx.plot([a["m"] for a in rows], [max(a["peak_held_bytes"]) / MB for a in rows], "^--", color=c,
                mfc="none", label=f"{schedule}: + send buffers held to step end")
    for x in (ax, bx):
        x.set_xscale("log", base=2)
        x.set_xticks(ms, [str(m) for m in ms])
        x.set_xlabel("micro-batches m (fixed micro-batch size)")
        x.grid(alpha=0.3)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("pipeline efficiency = busy / (p x wall)")
    ax.set_title(f"efficiency vs m, p={p}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    bx.set_ylim(bottom=0)
    bx.set_ylabel("peak MB on the worst stage")
    bx.set_title("peak activation memory (max over stages)", fontsize=9)
    bx.legend(fontsize=7, loc="upper left")
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    return common.save_figure(plt, fig, path)


def plot_timeline(panels: list[tuple[str, list[dict], object]], path: Path, title: str) -> Path | None:
    """panels: (label, measured ranks of one step, SimResult) per schedule."""
    plt = common.pyplot(TAG)
    if plt is None:
        return None
    from matplotlib.patches import Patch
    n = len(panels)
    p = len(panels[0][1]) if panels else 1
    fig, axes = plt.subplots(2 * n, 1, figsize=(13, 1.0 + 2 * n * (0.45 * p + 0.6)), squeeze=False)
    end = max(max(r["t1"] for r in ranks) for _, ranks, _ in panels)
    end = max([end] + [sim.makespan for _, _, sim in panels if sim is not None])
    for i, (label, ranks, sim) in enumerate(panels):
        ax, sx = axes[2 * i][0], axes[2 * i + 1][0]
        for r, rr in enumerate(ranks):
            y = p - 1 - r
            ax.broken_barh([(rr["t0"], rr["t1"] - rr["t0"])], (y - 0.45, 0.9), facecolors="none",
                           edgecolors="0.5", linestyles="dotted")
            for a, b, op, mb, _ in rr["trace"]:
                w = max(b - a, end * 0.0008) if op in SENDS else b - a
                ax.broken_barh([(a, w)], (y - 0.4, 0.8), facecolors=_COLORS.get(op, "0.5"),
                               edgecolors="white" if op in COMPUTE else "none", linewidth=0.5)
                if op in COMPUTE and (b - a) > end * 0.02:
                    ax.text((a + b) / 2, y, f"{op[0].upper()}{mb}", ha="center", va="center",
                            fontsize=6, color="white")
        ax.set_title(f"{label}: measured (one step, rank 0's train_step start = 0; dotted box = train_step)",
                     fontsize=8, loc="left")
        if sim is not None:
            for s, tl in enumerate(sim.timelines):
                y = p - 1 - s
                for e in tl:
                    if e.op in COMPUTE:
                        sx.broken_barh([(e.start, e.end - e.start)], (y - 0.4, 0.8),
                                       facecolors=_COLORS[e.op], edgecolors="white", linewidth=0.5, alpha=0.7)
                        if e.end - e.start > end * 0.02:
                            sx.text((e.start + e.end) / 2, y, f"{e.op[0].upper()}{e.mb}", ha="center",
                                    va="center", fontsize=6, color="white")
            sx.set_title(f"{label}: simulator with the measured mean F/B cost (free messages, no optimizer)",
                         fontsize=8, loc="left")
        for x in (ax, sx):
            x.set_yticks(range(p), [f"stage {p - 1 - k}" for k in range(p)], fontsize=7)
            x.set_xlim(0, end * 1.01)
            x.grid(axis="x", alpha=0.3)
    axes[-1][0].set_xlabel("seconds")
    handles = [Patch(color=_COLORS[k], label=lab) for k, lab in
               (("forward", "forward"), ("backward", "backward"), ("recv_act", "blocked in recv (act/grad)"),
                ("send_act", "post isend"), ("reduce_grads", "reduce_grads: wait for sends"),
                ("step", "step: tied wte + norm allreduce + AdamW"))]
    fig.suptitle(textwrap.fill(title, 170), fontsize=8, y=0.995)
    fig.legend(handles=handles, loc="upper center", ncol=6, fontsize=7, bbox_to_anchor=(0.5, 0.96))
    return common.save_figure(plt, fig, path, rect=(0, 0, 1, 0.93))


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(argv or [])
    args = parse(argv)
    out = Path(args.out)
    stem = out.with_suffix("")
    n_cores = cores()
    if args.pp > n_cores:
        common.say(TAG, f"note: {args.pp} ranks on {n_cores} cores oversubscribes the machine; step times "
                        f"then measure time-sharing, not the schedule (p={n_cores} is the realistic maximum here)")
    t_all = time.perf_counter()
    raw_path = Path(f"{stem}_raw.json")
    if args.from_raw:
        raw = common.read_json(args.from_raw)
        cmd = raw.get("command", [])
        args.m = sorted({v["m"] for v in raw["variants"]})
        args.schedules = list(dict.fromkeys(v["schedule"] for v in raw["variants"]))
        args.steps, args.warmup, args.per_round = raw["steps"], raw["warmup"], raw["per_round"]
    else:
        cmd = worker_command(args, str(raw_path))
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw, rc, _ = common.run_worker(cmd, raw_path, args.timeout, TAG,
                                       f"p={args.pp}, m={args.m}, schedules {', '.join(args.schedules)}")
        if raw is None:
            common.write_json(out, {"benchmark": "pipeline", "argv": ["hvdllm", "bench", "pipeline", *argv],
                                    "command": shlex.join(cmd), "failed": {"exit": rc}})
            return 1
        raw["command"] = cmd
        common.write_json(raw_path, raw)
    p = raw["p"]
    order = {name: i for i, name in enumerate(dict.fromkeys(v["schedule"] for v in raw["variants"]))}
    order = {name: i for i, name in enumerate(args.schedules)} if not args.from_raw else order
    raw["variants"].sort(key=lambda v: (order.get(v["schedule"], len(order)), v["m"]))
    variants = [analyse_variant(raw, v) for v in raw["variants"]]
    mc = raw["model_config"]
    from hvdllm import config as config_mod
    from hvdllm.params import count
    mcfg = config_mod.ModelConfig(**mc)
    n_params = count(mcfg)
    split = " | ".join(",".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)
                       for chunks in raw["stage_layers"])
    title = (f"hvdllm bench pipeline: p={p}, GPT {mc['n_layer']}x{mc['n_embd']} ({n_params:,} params), "
             f"layers per stage {split} (0 = embeddings, {mc['n_layer'] + 1} = head), "
             f"micro-batch {raw['microbatch']}x{mc['block_size']} tokens, 1 thread/rank, "
             f"median of {args.steps} steps")
    rows = table_rows(variants)
    print(f"\n{title}")
    common.print_table(rows, TABLE, EFF_LIMITS)
    print("\nwhere each rank's step time goes (seconds, medians over the timed steps; F/B: per micro-batch):")
    common.print_table(breakdown_rows(variants), BREAKDOWN)
    gl = goals(variants, p)
    print()
    common.print_table(gl, [("schedule", "schedule"), ("measure", "measure"), ("at", "at"),
                            ("worst", "worst"), ("worst_m", "worst at m"), ("target", "target"), ("met", "met")])
    other = raw.get("foreign_cpu_cores")
    common.warn_if_busy(TAG, other)

    trace_m = args.trace_m or (GOAL_M_PER_P * p if GOAL_M_PER_P * p in args.m else max(args.m))
    files, panels = {}, []
    for a, v in zip(variants, raw["variants"]):
        if a["m"] != trace_m or a["median_step_index"] is None:
            continue
        ranks = v["steps"][a["median_step_index"]]
        fb = a["stage_fwd_bwd_s"]
        sim = simulated(p, a["m"], a["schedule"], statistics.mean(f for f, _ in fb), statistics.mean(b for _, b in fb))
        label = f"{a['schedule']} p={p} m={a['m']}"
        tpath = common.write_json(f"{stem}_{a['schedule']}_trace.json", chrome_trace(ranks, sim, label))
        spath = common.write_json(f"{stem}_{a['schedule']}_sim_trace.json", sim_trace(sim))
        files[f"trace_{a['schedule']}"], files[f"sim_trace_{a['schedule']}"] = str(tpath), str(spath)
        panels.append((label, ranks, sim))
    if not args.no_plot:
        png = plot_efficiency(variants, p, stem.with_suffix(".png"), title)
        if png:
            files["efficiency_png"] = str(png)
        if panels:
            tl = plot_timeline(panels, Path(f"{stem}_timeline.png"),
                               f"one step at m={trace_m} (the median-time step of each variant); " + title)
            if tl:
                files["timeline_png"] = str(tl)
    result = {
        "benchmark": "pipeline", "argv": ["hvdllm", "bench", "pipeline", *argv], "command": shlex.join(cmd),
        "raw": str(args.from_raw or raw_path),
        "backend": raw["backend"], "p": p, "m": args.m, "schedules": args.schedules,
        "oversubscribed": p > n_cores, "cores": n_cores, "model": raw["model"], "model_config": mc,
        "params": n_params, "partition": raw["partition"], "ranges": raw["ranges"],
        "stage_layers": raw["stage_layers"], "stage_params": raw["stage_params"],
        "microbatch": raw["microbatch"], "tokens_per_microbatch": raw["tokens_per_microbatch"],
        "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round, "threads_per_rank": 1,
        "definitions": {
            "eff_step": "sum over stages of forward+backward busy time / (p * train_step wall time)",
            "eff_pipe": "sum of busy time / (p * span from the first instruction to the last forward/backward)",
            "ideal": "1 - (p-1)/(m+p-1)", "frac": "eff / ideal",
            "peak_act_bytes": "peak bytes saved for backward (saved_tensors_hooks, per storage, parameters "
                              "excluded) + the kept stage output, sampled after each forward/backward",
            "peak_held_bytes": "peak_act_bytes + send buffers held by posted isends until reduce_grads",
        },
        "goal": {"frac_of_ideal": GOAL, "at_m_ge": GOAL_M_PER_P * p}, "goals": gl,
        "rows": rows, "variants": variants, "trace_m": trace_m, "files": files,
        "foreign_cpu_cores": other, "clock_offsets_s": raw["clock_offsets_s"], "one_host": raw["one_host"],
        "worker_setup_s": raw["setup_s"], "worker_timed_wall_s": raw["timed_wall_s"], "host": raw["host"],
        "env": raw["env"], "wall_s": time.perf_counter() - t_all,
    }
    path = common.write_json(out, result)
    for f in [path, *files.values()]:
        common.say(TAG, f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
