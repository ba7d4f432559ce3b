"""`hvdllm bench dp`: data-parallel step time of hvdllm against the baselines, and weak scaling.

    hvdllm bench dp [--np 2] [--steps N] [--warmup W] [--model small|medium|large|tiny]
                    [--backends torch,tensorflow] [--out runs/bench/dp.json]

For each backend this launches, one after the other,
    mpirun -np NP ... python -m hvdllm.bench.dp_worker --backend B ...    (the comparison)
    mpirun -np 1  ... python -m hvdllm.bench.dp_worker --backend B ...    (for scaling)
Within one launch the variants (hvdllm, hand-written Horovod, and for torch DDP over gloo) run
interleaved in rounds in the same process group, on the same model, batches and AdamW, with the
same global-norm clip, one compute thread per rank (see dp_worker.py). Speed goals are ratios
against a baseline measured in the same process group:

    hvdllm / hand <= 1.03      hvdllm / ddp <= 1.0 (torch)
    scaling efficiency = step(np=1) / step(np=NP) >= 0.85   (weak scaling: same per-rank batch)

Scaling efficiency is reported twice: against the np=1 launch (as defined), and against 'solo',
rank 0 stepping alone inside the np=NP group, interleaved with the others. The second is immune
to drift between launches (on shared or virtual machines two launches can differ markedly).
The goal table also gives the median of per-step paired ratios (steps of two variants that ran
side by side in one round) with quartiles: the noise band to read every ratio against.

It prints each mpirun command, a table, the goals, and writes JSON plus a bar plot (PNG) next
to it. A benchmark, not a test: nothing here fails on a slow result.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hvdllm.bench import common
from hvdllm.bench.dp_worker import MODELS, VARIANTS, free_port, param_count

TAG = "[bench dp]"
GOALS = {"hvdllm/hand": 1.03, "hvdllm/ddp": 1.0, "scaling_efficiency": 0.85}
# The default model: `tiny` is latency-bound (its scaling says little about the communication
# path); from `small` up gradient bytes and compute both grow with width^2 at a fixed per-rank
# batch, so the allreduce is amortised alike, and `medium`'s gradient message is large enough to
# be bandwidth-bound while a full run stays short.
DEFAULT_MODEL = "medium"


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench dp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2, help="ranks of the comparison run (default 2)")
    common.add_timing_options(p, steps=30, warmup=3)
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"GPT size (default {DEFAULT_MODEL}); "
                        + "; ".join(f"{k}: {v[0]}x{v[1]}, {v[2]} heads, T={v[3]}, batch {v[5]}/rank"
                                    for k, v in MODELS.items()))
    p.add_argument("--backends", default="torch,tensorflow", help="comma list: torch,tensorflow")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip in every variant (0: none)")
    p.add_argument("--no-scaling", action="store_true", help="skip the np=1 runs")
    p.add_argument("--repeats", type=int, default=1,
                   help="launch the np=NP / np=1 pair this many times, alternating, and pool the "
                        "step times (evens out drift between launches on a shared machine)")
    common.add_env_option(p)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each launch wait up to this long for other processes to leave "
                        "the cores idle (shared machines); 0 = start at once")
    common.add_output_options(p, "dp")
    a = p.parse_args(argv)
    a.backends = common.backend_list(p, a.backends)
    if a.np < 1 or a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        p.error("--np, --steps and --repeats must be >= 1, --warmup >= 0")
    return a


def worker_command(np_: int, backend: str, args, out: str) -> list[str]:
    """The exact mpirun argv of one worker launch."""
    return common.worker_command("hvdllm.bench.dp_worker", np_, [
        "--backend", backend, "--model", args.model, "--steps", args.steps, "--warmup", args.warmup,
        "--per-round", args.per_round, "--grad-clip", args.grad_clip, "--threads", 1, "--out", out,
        *(["--ddp-port", free_port()] if backend == "torch" else [])], args.env)


def pool(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """{(backend, np): run} with the step times of repeated launches pooled per variant, and the
    per-step ratios between variants of the same launch (step i of A over step i of B ran in the
    same round, side by side, so drift largely cancels in them)."""
    by: dict[tuple[str, int], dict] = {}
    for r in runs:
        key = (r["backend"], r["np"])
        if key not in by:
            by[key] = {"backend": r["backend"], "np": r["np"], "launches": 0, "tokens": {},
                       "times": {}, "paired": {}}
        m = by[key]
        m["launches"] += 1
        v = r["variants"]
        for name in v:
            m["times"].setdefault(name, []).extend(v[name]["step_times_s"])
            m["tokens"][name] = v[name].get("tokens_per_step", r["tokens_per_step"])
        for a, b in PAIRS:
            if a in v and b in v:
                m["paired"].setdefault(f"{a}/{b}", []).extend(
                    x / y for x, y in zip(v[a]["step_times_s"], v[b]["step_times_s"]))
    for m in by.values():
        m["variants"] = {}
        for name, ts in m.pop("times").items():
            s = common.summarize(ts)
            s["tokens_per_s"] = m["tokens"][name] / s["median_s"]
            m["variants"][name] = s
        m["paired"] = {k: common.summarize(r) for k, r in m["paired"].items()}
    return by


PAIRS = [("hvdllm", "hand"), ("hvdllm", "ddp"), ("ddp", "hand"),
         ("solo", "hvdllm"), ("solo", "hand"), ("solo", "ddp")]


def analyse(runs: list[dict], np_: int) -> tuple[list[dict], dict, list[dict]]:
    """Table rows, ratios {backend: {...}}, goal rows from the worker results.

    A ratio is the ratio of the two variants' median step times (the goals' definition); the
    goal table also shows the median of per-step paired ratios with its quartiles (a check on
    noise: where the two disagree, the machine was too busy to settle the goal)."""
    rows, ratios, goals = [], {}, []
    by = pool(runs)
    for backend in dict.fromkeys(r["backend"] for r in runs):
        multi, single = by.get((backend, np_)), by.get((backend, 1)) if np_ != 1 else None
        rat = ratios.setdefault(backend, {})
        paired = multi["paired"] if multi else {}
        if multi:
            v = multi["variants"]
            for a, b in PAIRS:
                if a in v and b in v:
                    rat[f"{a}/{b}"] = v[a]["median_s"] / v[b]["median_s"]
            rat["paired"] = paired
        eff, eff_group = {}, {}
        if multi and single:  # separate launches: np=1 against np=NP
            for name, s in multi["variants"].items():
                if name in single["variants"] and name != "solo":
                    eff[name] = single["variants"][name]["median_s"] / s["median_s"]
            rat["scaling_efficiency"] = eff
        if multi and "solo" in multi["variants"]:  # rank 0 alone, interleaved in the same group
            solo = multi["variants"]["solo"]["median_s"]
            eff_group = {n: solo / s["median_s"] for n, s in multi["variants"].items() if n != "solo"}
            rat["scaling_efficiency_in_group"] = eff_group
        for run in (multi, single):
            if not run:
                continue
            base = "hand" if "hand" in run["variants"] else None
            for name, s in run["variants"].items():
                solo = name == "solo"
                rows.append({
                    "backend": backend, "variant": name, "np": 1 if solo else run["np"],
                    "median_s": s["median_s"], "p25_s": s["p25_s"], "p75_s": s["p75_s"],
                    "tokens_per_s": s["tokens_per_s"],
                    "ratio": None if solo or not base
                    else s["median_s"] / run["variants"][base]["median_s"],
                    "baseline": f"(in np={run['np']} group)" if solo else
                                "-" if not base else (base if name != base else "(baseline)"),
                    "scaling_eff": eff.get(name) if run is multi else None,
                    "scaling_eff_group": eff_group.get(name) if run is multi else None})
        for key in ("hvdllm/hand", "hvdllm/ddp"):
            if key in rat:
                pr = paired.get(key, {})
                goals.append({"backend": backend, "goal": key, "value": rat[key],
                              "paired": pr.get("median_s"), "paired_iqr": _iqr(pr),
                              "target": f"<= {GOALS[key]:.2f}",
                              "met": "yes" if rat[key] <= GOALS[key] else "NO"})
        target = GOALS["scaling_efficiency"]
        for name, e in eff.items():
            goals.append({"backend": backend, "goal": f"scaling eff, np=1 launch ({name})", "value": e,
                          "paired": None, "paired_iqr": "-", "target": f">= {target:.2f}",
                          "met": "yes" if e >= target else "NO"})
        for name, e in eff_group.items():
            pr = paired.get(f"solo/{name}", {})
            goals.append({"backend": backend, "goal": f"scaling eff, in-group solo ({name})", "value": e,
                          "paired": pr.get("median_s"), "paired_iqr": _iqr(pr),
                          "target": f">= {target:.2f}", "met": "yes" if e >= target else "NO"})
    return rows, ratios, goals


def _iqr(s: dict) -> str:
    return f"{s['p25_s']:.3f}-{s['p75_s']:.3f}" if s.get("n") else "-"


TABLE = [("backend", "backend"), ("variant", "variant"), ("np", "np"), ("median_s", "median step s"),
         ("p25_s", "p25 s"), ("p75_s", "p75 s"), ("tokens_per_s", "tokens/s"),
         ("ratio", "ratio vs baseline"), ("baseline", "baseline"), ("scaling_eff", "scaling eff"),
         ("scaling_eff_group", "scaling eff (in-group)")]
# scaling efficiency cannot exceed 1: a value above it is flagged in the table
EFFICIENCY_LIMITS = {"scaling_eff": 1.0, "scaling_eff_group": 1.0}
GOAL_TABLE = [("backend", "backend"), ("goal", "goal"), ("value", "ratio of medians"),
              ("paired", "per-step paired"), ("paired_iqr", "paired p25-p75"), ("target", "target"),
              ("met", "met")]


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = common.pyplot(TAG)
    if plt is None:
        return None
    labels = [f"{r['backend']}\n{r['variant']} np={r['np']}" for r in rows]
    values = [r["median_s"] for r in rows]
    errs = [[r["median_s"] - r["p25_s"] for r in rows], [r["p75_s"] - r["median_s"] for r in rows]]
    colors = {"hvdllm": "tab:blue", "hand": "tab:orange", "ddp": "tab:green"}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    bars = ax.bar(range(len(rows)), values, yerr=errs, capsize=3,
                  color=[colors.get(r["variant"], "tab:gray") for r in rows])
    for bar, r in zip(bars, rows):
        if r["np"] == 1:  # the single-rank runs (for scaling) are hatched
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("median step time, s (bars: p25-p75)")
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    return common.save_figure(plt, fig, path)


def main(argv=None) -> int:
    args = parse(list(argv or []))
    out = Path(args.out)
    sizes = [args.np] + ([] if args.no_scaling or args.np == 1 else [1])
    plan = [(b, n) for b in args.backends for _ in range(args.repeats) for n in sizes]
    n_params = param_count(args.model)
    L, C, H, T, V, B = MODELS[args.model]
    common.say(TAG, f"model {args.model}: {L} layers x {C} wide, {H} heads, T={T}, vocab {V}, "
                    f"{n_params:,} parameters; batch {B} sequences/rank; {args.warmup} warm-up + "
                    f"{args.steps} timed steps per variant; {len(plan)} launches")
    runs, commands, failed = [], [], []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-") as tmp:
        for i, (backend, n) in enumerate(plan, 1):
            part = os.path.join(tmp, f"{i:02d}-{backend}-np{n}.json")
            cmd = worker_command(n, backend, args, part)
            commands.append(cmd)
            label = f"({i}/{len(plan)}) {backend} np={n}"
            run, rc, wall = common.run_worker(cmd, part, args.timeout, TAG,
                                              f"{label}, variants {', '.join(VARIANTS[backend])}", args.wait_quiet)
            if run is None:
                failed.append({"backend": backend, "np": n, "exit": rc, "command": cmd})
                continue
            run["command"], run["wall_s"] = cmd, wall
            runs.append(run)
            med = ", ".join(f"{k} {v['median_s']:.4f} s" for k, v in run["variants"].items())
            common.say(TAG, f"{label} done in {wall:.0f} s: median step {med}")
            early = run.get("weights_rel_diff_after_warmup") or {}
            late = run.get("weights_rel_diff_vs_first") or {}
            if early:
                same = all(v == 0.0 for v in [*early.values(), *late.values()])
                common.say(TAG, ("same arithmetic, bit for bit" if same else "NOT the same arithmetic")
                           + ": relative weight difference from hvdllm after the warm-up / after the run: "
                           + ", ".join(f"{k} {v:.1e} / {late.get(k, float('nan')):.1e}" for k, v in early.items()))
            common.warn_if_busy(TAG, run.get("foreign_cpu_cores"))
    rows, ratios, goals = analyse(runs, args.np)
    title = (f"hvdllm bench dp: {args.model} GPT ({L}x{C}, {n_params:,} params), batch {B}x{T} "
             f"tokens/rank, 1 thread/rank, clip {args.grad_clip:g} in every variant")
    print(f"\n{title}")
    if rows:
        common.print_table(rows, TABLE, EFFICIENCY_LIMITS)
    if goals:
        print()
        eff = lambda g: 1.0 if "scaling eff" in g["goal"] else None  # noqa: E731
        common.print_table(goals, GOAL_TABLE, {"value": eff, "paired": eff})
    result = {
        "benchmark": "dp", "argv": ["hvdllm", "bench", "dp", *list(argv or [])],
        "model": args.model, "model_config": {"n_layer": L, "n_embd": C, "n_head": H, "block_size": T,
                                              "vocab_size": V},
        "params": n_params, "batch_per_rank": B, "np": args.np, "steps": args.steps,
        "warmup": args.warmup, "per_round": args.per_round, "grad_clip": args.grad_clip,
        "threads_per_rank": 1, "repeats": args.repeats, "wait_quiet_s": args.wait_quiet,
        "env": args.env, "goals_target": GOALS,
        "commands": [shlex.join(c) for c in commands], "runs": runs, "failed": failed,
        "rows": rows, "ratios": ratios, "goals": goals, "wall_s": time.perf_counter() - t_all,
    }
    path = common.write_json(out, result)
    common.say(TAG, f"wrote {path}")
    if rows and not args.no_plot:
        png = plot(rows, out.with_suffix(".png"), title)
        if png:
            common.say(TAG, f"wrote {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
