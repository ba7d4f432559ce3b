"""`hvdllm bench plan`: `hvdllm plan`'s predictions against real `hvdllm train` runs on this node:
step time and peak memory per rank, for layouts at np = 1, 2 and 4 (dp, accumulation, ZeRO,
pp, tp and mixes), each at the same global batch.

    hvdllm bench plan [--calibration FILE] [--system this-cpu] [--steps 8] [--warmup 3]
                      [--layouts all|NAME,...] [--out runs/bench/plan.json]

For each layout it launches, with the command `hvdllm launch` builds,
    mpirun -np N ... python -m hvdllm train --set ... (the bench GPT, the layout's settings)
reads the step times from its metrics.jsonl (median after --warmup steps), and runs it twice
more for memory (below). Predictions come from
hvdllm.plan.predict with the calibration (default: measured first by `hvdllm bench calibrate
--np 2 --model small`, the layouts' own model, on this node as it is loaded now).

Definitions:
    time error    predicted / measured step time - 1
    memory        measured in a second run of the layout, glibc returning freed blocks of
                  64 KiB or more at once (MALLOC_MMAP_THRESHOLD_=65536; its default heap keeps
                  the holes freed activations leave): the largest trainer's peak resident memory
                  in training (VmHWM reset at the first step, hvdllm/trainer.py) minus the same
                  of the same layout over a 2-layer, 32-wide model (the framework, the code the
                  layout runs, MPI's and Horovod's buffers: what memory.py does not model);
                  predicted: memory.py's bytes of the rank it names, minus the tiny model's
    ranks > cores the calibration's CPU-time terms are shared: compute rate and copy bandwidth
                  divided, the fixed cost per layer multiplied, by ranks / cores (the ranks then
                  take turns on the cores), which the planner itself does not know
Goals (issue 17): median |time error| <= 15 %, median |memory error| <= 10 %.
A benchmark, not a test: nothing fails on a missed goal.

    hvdllm bench plan --published [FILE] [--out runs/bench/plan_published.json]

measures nothing: for each row of a published table (hvdllm/published.json: layouts and
throughputs of large runs on GPU clusters, with their source) the planner's prediction at that
exact layout with the table's system defaults (hvdllm/calibration.json), against the published
TFLOP/s per GPU: error = predicted / published - 1, per row and the median |error|. Two
predictions per row: as hvdllm's engines would run the layout (no communication overlapped),
and with the overlaps the published run states (plan.predict's `overlap`), the like-for-like one.
It is a flag of `bench plan` (not of `hvdllm plan`) because it is the same predicted-vs-measured
check with someone else's measurements; `hvdllm plan` plans a config and stays about that.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hvdllm import config as config_mod
from hvdllm import memory
from hvdllm import plan as planner
from hvdllm.bench import common
from hvdllm.launch import command
from hvdllm.runtime import cores

TAG = "[bench plan]"
MODEL = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=128", "model.vocab_size=256"]
BASE = ["data.max_bytes=400000", "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0",
        "train.progress=false", "train.plot=false", "train.checkpoint_every=0", "train.threads=1",
        "optim.warmup_steps=2", "backend=torch"]
GLOBAL = 8   # sequences per step, every layout
TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2"]   # the memory runs' baseline model
MEMORY_STEPS = 4   # the live peak is reached by step 2 (the first AdamW step allocates its moments)
RELEASE = ("MALLOC_MMAP_THRESHOLD_=65536",)   # glibc returns a freed block of 64 KiB or more at once
PUBLISHED = Path(planner.__file__).with_name("published.json")
# name: (dp, pp, tp, zero, micro-batch sequences, micro-batches per step)
LAYOUTS = {
    "np1": (1, 1, 1, 0, 8, 1), "np1-acc2": (1, 1, 1, 0, 4, 2),
    "dp2": (2, 1, 1, 0, 4, 1), "dp2-z1": (2, 1, 1, 1, 4, 1), "dp2-z2": (2, 1, 1, 2, 4, 1),
    "pp2-m4": (1, 2, 1, 0, 2, 4), "tp2": (1, 1, 2, 0, 8, 1),
    "dp4": (4, 1, 1, 0, 2, 1), "dp2-tp2": (2, 1, 2, 0, 4, 1), "dp2-pp2": (2, 2, 1, 0, 2, 2),
    "pp2-tp2": (1, 2, 2, 0, 2, 4), "dp4-z3": (4, 1, 1, 3, 2, 1),
}


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", help="calibration JSON (default: measure one first, `hvdllm bench "
                                         "calibrate --np 2` on the bench's own model)")
    p.add_argument("--system", help="its system (default: the file's default system)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--layouts", default="all", help=f"comma list of {', '.join(LAYOUTS)}, or all")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more settings for every run (e.g. a model.* override)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--out", default=None, help="JSON written (default runs/bench/plan.json, "
                                               "runs/bench/plan_published.json with --published)")
    p.add_argument("--published", nargs="?", const=str(PUBLISHED), default=None, metavar="FILE",
                   help="compare with published large-scale runs instead (default table: hvdllm/published.json); "
                        "runs nothing")
    a = p.parse_args(argv)
    a.out = a.out or ("runs/bench/plan_published.json" if a.published else "runs/bench/plan.json")
    a.names = list(LAYOUTS) if a.layouts == "all" else [n.strip() for n in a.layouts.split(",") if n.strip()]
    bad = [n for n in a.names if n not in LAYOUTS]
    if bad or a.steps <= a.warmup:
        p.error(f"--layouts: unknown {bad}" if bad else "--steps must exceed --warmup")
    return a


def published_model(table: dict, row: dict) -> list[str]:
    """The `--set` overrides of a published row's model (the table's common settings + the row's shape)."""
    return [*(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in table["model"].items()),
            f"model.n_layer={row['layers']}", f"model.n_head={row['heads']}", f"model.n_embd={row['hidden']}",
            f"model.block_size={table['sequence_length']}", f"model.vocab_size={table['vocab_size']}",
            f"train.precision={table['precision']}"]


def _holds(condition: str, row: dict) -> bool:
    """A row note's condition, 'COLUMN>N' or 'COLUMN=N' (published.json's row_notes)."""
    for op, test in ((">", lambda a, b: a > b), ("=", lambda a, b: a == b)):
        if op in condition:
            col, value = condition.split(op)
            return test(row[col], float(value))
    raise ValueError(f"published.json: row note condition {condition!r} is not COLUMN>N or COLUMN=N")


def compare_published(path: str | None = None, calibration: str | None = None) -> dict:
    """Every published row against the planner at its layout: {table name: {"rows", "median_abs_error",
    "median_abs_error_no_overlap", "source", ...}}. Deterministic: nothing is run."""
    data = json.loads(Path(path or PUBLISHED).read_text())
    out = {}
    for name, t in data["tables"].items():
        system = planner.load_calibration(calibration, t["system"])
        dpn = system.devices_per_node
        assumed, peak = t["assumed"], system.peak(t["precision"])
        rows = []
        for values in t["rows"]:
            r = dict(zip(t["columns"], values))
            cfg = config_mod.load(None, [*published_model(t, r), f"parallel.schedule={assumed['schedule']}"])
            per_rank, micro = r["batch"] // r["dp"], assumed["micro_batch"]
            ckpt = assumed.get("activation_checkpointing", "none")
            cand = planner.Candidate(r["dp"], r["pp"], r["tp"], assumed["zero"], micro, per_rank // micro, ckpt)
            c = planner.apply(cfg, cand)
            problems = planner.valid(c, r["gpus"])
            if r["dp"] * r["pp"] * r["tp"] != r["gpus"] or r["batch"] % (r["dp"] * micro):
                problems.append("the row's layout does not multiply out to its GPUs / batch")
            # model FLOPs as the table counts them (Narayanan et al. 2021: 72 B s l h^2 (1 + s/6h + V/12lh)
            # for a 4h MLP): the multiplied matrices and attention, not the embedding lookup; a table
            # that counts the recomputed forward too (the paper's own 96 B s l h^2 (1 + s/6h + V/16lh))
            # says so, and its blocks (not the head) count 4/3
            per_layer = planner._model_flops(memory._frozen(c.model))[0]
            again = 4 / 3 if t.get("flops_count_recompute") else 1.0
            flops = sum(f * (again if 1 <= i <= c.model.n_layer else 1.0) for i, f in enumerate(per_layer)) \
                * cand.dp * cand.micro * cand.k * c.model.block_size
            row = {"model": r["model"], "gpus": r["gpus"], "tp": r["tp"], "pp": r["pp"], "dp": r["dp"],
                   "batch": r["batch"], "layout": cand.label(), "problems": problems,
                   "notes": [n for cond, n in assumed.get("row_notes", {}).items() if _holds(cond, r)],
                   "published_tflops": r["tflops_per_gpu"], "published_mfu": r["mfu"]}
            # no_overlap: the layout as hvdllm's engines run it; overlap: as the published run did
            for key, kw in (("no_overlap", {}), ("overlap", {"overlap": tuple(t.get("overlapped", ())),
                                                             "param_bytes": t.get("param_gather_bytes", 4)})):
                pred = planner.predict(c, cand, system, dpn, t["precision"], **kw)
                tflops = flops / (pred["step_s"] * r["gpus"]) / 1e12
                row[key] = {"step_s": pred["step_s"], "tflops": tflops, "mfu": tflops * 1e12 / peak,
                            "error": tflops / r["tflops_per_gpu"] - 1, "bubble": pred["bubble"],
                            "compute_s": pred["compute_s"], "tp_s": pred["tp_s"], "pp_s": pred["pp_s"],
                            "dp_s": pred["dp_s"], "fits": pred["fits"],
                            "memory_gib": pred["memory"]["device"] / planner.GiB}
            rows.append(row)
        out[name] = {"source": t["source"], "assumed": assumed, "system": system.name, "rows": rows,
                     **{f"median_abs_error{suffix}": statistics.median(abs(r[key]["error"]) for r in rows)
                        for key, suffix in (("overlap", ""), ("no_overlap", "_no_overlap"))}}
    return out


def print_published(result: dict) -> None:
    for name, t in result.items():
        print(f"\n{TAG} {name} ({t['system']}); source: {t['source']}")
        print(f"{TAG} assumed: {t['assumed']['why']}; not represented: {t['assumed']['not_represented']}")
        table = [{"model": r["model"], "gpus": r["gpus"], "layout": r["layout"],
                  "pub": f"{r['published_tflops']:.1f}", "pub_mfu": f"{r['published_mfu']:.2f}",
                  "pred": f"{r['overlap']['tflops']:.1f}", "mfu": f"{r['overlap']['mfu']:.3f}",
                  "err": f"{r['overlap']['error']:+.1%}", "pred0": f"{r['no_overlap']['tflops']:.1f}",
                  "err0": f"{r['no_overlap']['error']:+.1%}", "bubble": f"{r['overlap']['bubble']:.3f}",
                  "mem": f"{r['overlap']['memory_gib']:.1f}" + ("" if r["overlap"]["fits"] else " NO"),
                  "note": "; ".join([*r["problems"], *r["notes"]]) or "-"} for r in t["rows"]]
        common.print_table(table, ["model", "gpus", "layout", ("pub", "pub TF/s"), ("pub_mfu", "pub MFU"),
                                   ("pred", "pred TF/s"), ("mfu", "pred MFU"), ("err", "error"),
                                   ("pred0", "no-overlap TF/s"), ("err0", "no-overlap err"), "bubble",
                                   ("mem", "GiB/dev"), "note"])
        print(f"median |error| {t['median_abs_error']:.1%} with the run's overlaps, "
              f"{t['median_abs_error_no_overlap']:.1%} as hvdllm's engines would run it (nothing overlapped)")


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"hvdllm" not in f.read():
                return None
        return common.proc_status("VmHWM", pid)
    except (OSError, KeyError):
        return None


def run_measured(cmd: list[str], timeout: float) -> tuple[int, dict[int, int], str]:
    """Run cmd in its own session, sampling each hvdllm process's peak RSS: (exit code,
    {pid: peak bytes}, output tail)."""
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, cwd=common.ROOT, env=common.launch_env(), stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, text=True)
    peaks: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            break
        for pid in _descendants(p.pid)[1:]:
            rss = _peak_rss(pid)
            if rss:
                peaks[pid] = max(peaks.get(pid, 0), rss)
        time.sleep(0.2)
    log.seek(0)
    return p.returncode, peaks, log.read()[-3000:]


def train_command(np_: int, sets: list[str], env: tuple = ()) -> list[str]:
    return command("mpirun", np_, ["train", *[a for kv in sets for a in ("--set", kv)]], env=["PYTHONPATH", *env])


def measure(name: str, sets: list[str], np_: int, out_dir: Path, a, steps: int | None = None,
            env: tuple = ()) -> dict:
    run_dir = out_dir / name
    cmd = train_command(np_, [*sets, f"train.out_dir={run_dir}", f"train.steps={steps or a.steps}"], env)
    common.say(f"\n{TAG}", f"{name} (np={np_}):\n  {' '.join(cmd)}")
    rc, peaks, tail = run_measured(cmd, a.timeout)
    if rc != 0:
        common.say(TAG, f"{name} FAILED (exit {rc}):\n{tail}")
        return {"ok": False, "rc": rc}
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in recs if "step_time_s" in r and r["step"] > a.warmup]
    # the trainers' own peak in training (VmHWM reset at the first step, read at the last logged
    # one: hvdllm/trainer.py), which start-up's transients and the final checkpoint do not reach
    train = re.search(r"peak resident memory in training: ([\d.]+) MiB on the largest", tail)
    return {"ok": True, "step_s": statistics.median(times), "step_times_s": times,
            "peak_rss": float(train.group(1)) * common.MB if train else None,
            "process_peak_rss": max(peaks.values()) if peaks else None, "rss_per_rank": sorted(peaks.values())}


def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out)
    if a.published:
        result = compare_published(a.published, a.calibration)
        print_published(result)
        common.write_json(out, {"benchmark": "plan --published", "tables": result,
                                "command": "hvdllm bench plan " + " ".join(argv or [])})
        print(f"{TAG} wrote {out}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cal = a.calibration
        if cal is None:   # this node, now, on the layouts' own model
            from hvdllm.bench import calibrate
            cal = str(tmp / "calibration.json")
            if calibrate.main(["--np", str(min(2, cores())), "--model", "small", "--out", cal]) != 0:
                return 1
        system = planner.load_calibration(cal, a.system)
        bases = {}
        for name in a.names:
            dp, pp, tp, zero, micro, k = LAYOUTS[name]
            cand = planner.Candidate(dp, pp, tp, zero, micro, k)
            cfg = config_mod.load(None, [*BASE, *MODEL, *a.set])
            np_ = dp * pp * tp
            sets = [*BASE, *MODEL, *a.set, *cand.sets(cfg)]
            c = planner.apply(cfg, cand)
            config_mod.validate(c, np_)
            # ranks > cores take turns on them: every term that is CPU time on a rank stretches
            # alike, the matrix products, the fixed cost per layer (Python, kernel launches) and
            # the optimizer's passes over memory
            shared = max(1.0, np_ / cores())
            dev = system.device
            sys_np = dataclasses.replace(system, device={
                **dev, "achieved_flops": {"fp32": system.rate("fp32") / shared},
                "overhead_per_layer_s": dev.get("overhead_per_layer_s", 0.0) * shared,
                **({"memory_bandwidth": dev["memory_bandwidth"] / shared} if "memory_bandwidth" in dev else {})})
            pred = planner.predict(c, cand, sys_np, devices_per_node=max(np_, 1))
            got = measure(name, sets, np_, tmp, a)
            # memory: the same layout again with glibc returning freed blocks at once (its default
            # heap keeps the holes freed activations leave, which no model of live bytes can
            # predict), against the same layout over a tiny model (the framework, the code paths
            # the layout runs, MPI's and Horovod's buffers: what memory.py does not model); the
            # tiny model's own predicted bytes are subtracted from the prediction alike
            tiny = [*BASE, *a.set, *TINY, *cand.sets(cfg)]
            c_tiny = planner.apply(config_mod.load(None, [*BASE, *a.set, *TINY]), cand)
            pred_tiny = planner.predict(c_tiny, cand, sys_np, devices_per_node=max(np_, 1))
            mem = measure(f"{name}-memory", sets, np_, tmp, a, MEMORY_STEPS, RELEASE)
            base = bases[name] = measure(f"{name}-tiny", tiny, np_, tmp, a, MEMORY_STEPS, RELEASE)
            pred_mib = (pred["memory"]["device"] - pred_tiny["memory"]["device"]) / common.MB
            row = {"layout": name, "np": np_, "dp": dp, "pp": pp, "tp": tp, "zero": zero, "b": micro, "k": k,
                   "pred_ms": pred["step_s"] * 1e3, "pred_mib": pred_mib}
            if got["ok"]:
                row["meas_ms"] = got["step_s"] * 1e3
                row["time_err"] = pred["step_s"] / got["step_s"] - 1
            if mem["ok"] and base["ok"] and mem["peak_rss"] and base["peak_rss"]:
                row["meas_mib"] = (mem["peak_rss"] - base["peak_rss"]) / common.MB
                row["mem_err"] = row["pred_mib"] / row["meas_mib"] - 1 if row["meas_mib"] > 0 else None
            rows.append({**row, "raw": got, "raw_memory": mem})
    print()
    common.print_table(rows, ["layout", "np", "dp", "pp", "tp", "zero", "b", "k", ("pred_ms", "pred ms"),
                              ("meas_ms", "meas ms"), ("time_err", "time err"), ("pred_mib", "pred MiB"),
                              ("meas_mib", "meas MiB"), ("mem_err", "mem err")])
    t_err = [abs(r["time_err"]) for r in rows if r.get("time_err") is not None]
    m_err = [abs(r["mem_err"]) for r in rows if r.get("mem_err") is not None]
    med_t = statistics.median(t_err) if t_err else float("nan")
    med_m = statistics.median(m_err) if m_err else float("nan")
    peaks = [b["peak_rss"] / common.MB for b in bases.values() if b.get("peak_rss")] or [float("nan")]
    print(f"\nmedian |time error| {med_t:.1%} (goal <= 15%), median |memory error| {med_m:.1%} (goal <= 10%); "
          f"tiny-model baselines' peak RSS {min(peaks):.0f}-{max(peaks):.0f} MiB per rank; {cores()} cores")
    common.write_json(out, {"benchmark": "plan", "system": system.name, "rows": rows, "baselines": bases,
                            "median_abs_time_error": med_t, "median_abs_memory_error": med_m,
                            "command": "hvdllm bench plan " + " ".join(argv or []), "calibration": cal})
    print(f"{TAG} wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
