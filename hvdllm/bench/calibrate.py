"""`hvdllm bench calibrate`: measure this node for `hvdllm plan`, and write the calibration JSON
that `hvdllm plan --calibration FILE` reads (the shape of hvdllm/calibration.json).

    hvdllm bench calibrate [--np 2] [--out runs/bench/calibration.json] [--model small]
                           [--batches 1,2,4,8] [--sizes 4096,4194304] [--reps 3] [--threads 1]

It launches
    mpirun -np N ... python -m hvdllm.bench.calibrate_worker ...
(hvdllm/bench/calibrate_worker.py says what each rank measures) and fits:
    compute      seconds per step of the GPT at each batch, t = a + FLOPs / rate (least squares
                 over the batches; the slowest rank's time per batch): rate is the achieved
                 FLOP/s ('achieved_flops'), a / layers the fixed cost per layer and step
                 ('overhead_per_layer_s'); the largest matrix product's FLOP/s is the device's
                 'peak_flops' (MFU's reference on a CPU, which has no datasheet peak here)
    collectives  per kind, t = c * S / busbw + k * latency over the sizes, with c = 2(n-1)/n and
                 k = 2(n-1) for allreduce, c = (n-1)/n and k = n-1 for reduce-scatter and
                 allgather (S the whole buffer): the ring model plan uses, so busbw is nccl-tests'
                 bus bandwidth
    p2p          t = S / bandwidth + latency (one way)
    memory       MemTotal / ranks on the node per device; copy bandwidth for AdamW's time
One node only: the file's inter-node link repeats the node's (say so where you plan for more
nodes). A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

import numpy as np

from hvdllm.bench import common

TAG = "[bench calibrate]"
SYSTEM, DEVICE, LINK = "this-machine", "this-cpu", "this-node"


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2, help="ranks on this node (default 2)")
    p.add_argument("--model", default="small", choices=list(common.GPT_MODELS),
                   help="the GPT timed; " + "; ".join(f"{k}: {v[0]}x{v[1]}, T={v[3]}"
                                                      for k, v in common.GPT_MODELS.items()))
    p.add_argument("--batches", default="1,2,4,8", help="sequences per timed step (comma list, >= 2 values)")
    p.add_argument("--sizes", default="4096,4194304", help="message bytes (comma list, >= 2 values)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each (median)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--matmul", type=int, default=512, help="side of the square matrix product timed as peak")
    p.add_argument("--timeout", type=float, default=300, help="seconds the mpirun may take")
    p.add_argument("--out", default="runs/bench/calibration.json", help="calibration JSON written")
    a = p.parse_args(argv)
    a.batch_list = [int(v) for v in a.batches.split(",") if v.strip()]
    a.size_list = [int(v) for v in a.sizes.split(",") if v.strip()]
    if len(a.batch_list) < 2 or len(a.size_list) < 2 or min(a.batch_list + a.size_list) < 1:
        p.error("--batches and --sizes need at least two values >= 1 each (a line is fitted through them)")
    if a.np < 1 or a.reps < 1:
        p.error("--np and --reps must be >= 1")
    return a


def worker_command(a, out: str) -> list[str]:
    n_layer, n_embd, n_head, block, vocab, _ = common.GPT_MODELS[a.model]
    return common.worker_command("hvdllm.bench.calibrate_worker", a.np, [
        "--backend", "torch", "--model", f"{n_layer},{n_embd},{n_head},{block},{vocab}",
        "--batches", a.batches, "--sizes", a.sizes, "--reps", a.reps, "--threads", a.threads,
        "--matmul", a.matmul, "--out", out])


# ---------------------------------------------------------------------------------------------
# fits (pure functions of the worker's raw JSON)

def line_fit(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; the intercept is kept >= 0 (a fixed cost)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:   # noise below zero: through the origin instead
        slope, intercept = float(np.dot(x, y) / np.dot(x, x)), 0.0
    return float(intercept), float(slope)


def fit_compute(raw: dict) -> dict:
    per_rank = raw["compute"]
    points = []
    for i, p in enumerate(per_rank[0]["points"]):
        points.append({**p, "seconds": max(r["points"][i]["seconds"] for r in per_rank)})
    a, slope = line_fit([p["flops"] for p in points], [p["seconds"] for p in points])
    layers = per_rank[0]["layers"]
    return {"points": points, "overhead_s": a, "overhead_per_layer_s": a / layers,
            "achieved_flops": 1.0 / slope if slope > 0 else None,
            "peak_flops": min(r["matmul_flops"] for r in per_rank),
            "memory_bandwidth": min(r["memory_bandwidth"] for r in per_rank)}


RING = {"allreduce": (lambda n: 2 * (n - 1) / n, lambda n: 2 * (n - 1)),
        "reducescatter": (lambda n: (n - 1) / n, lambda n: n - 1),
        "allgather": (lambda n: (n - 1) / n, lambda n: n - 1)}


def fit_collectives(raw: dict) -> dict:
    n, out = raw["np"], {}
    for kind, rows in raw["collectives"].items():
        c, k = RING[kind][0](n), RING[kind][1](n)
        a, slope = line_fit([r["bytes"] for r in rows], [r["seconds"] for r in rows])
        out[kind] = {"busbw": c / slope if slope > 0 else c * rate(rows), "latency_s": a / k, "rows": rows}
    return out


def rate(rows) -> float:
    """Bytes per second of the best row: where noise gives the size fit no positive slope (a small
    message timed slower than a large one), what the largest messages reached, a lower bound."""
    return max(r["bytes"] / r["seconds"] for r in rows if r["seconds"] > 0)


def fit_p2p(raw: dict) -> dict | None:
    rows = raw["p2p"]
    if not rows:
        return None
    a, slope = line_fit([r["bytes"] for r in rows], [r["seconds"] for r in rows])
    return {"bandwidth": 1.0 / slope if slope > 0 else rate(rows), "latency_s": max(a, 0.0), "rows": rows}


def calibration(raw: dict, command: str) -> dict:
    """The calibration JSON plan reads: one device, one link, one system."""
    comp, coll, p2p = fit_compute(raw), fit_collectives(raw), fit_p2p(raw)
    best = max([c["busbw"] for c in coll.values() if c["busbw"]] or [comp["memory_bandwidth"]])
    lat = min([c["latency_s"] for c in coll.values()] or [0.0])
    link = {"bandwidth": best, "latency_s": lat, "efficiency": 1.0,
            "collectives": {k: {"busbw": v["busbw"] or best, "latency_s": v["latency_s"]} for k, v in coll.items()},
            "source": f"measured by hvdllm bench calibrate at np={raw['np']} on {raw['info']['host']}"}
    if p2p and p2p["bandwidth"]:
        link["p2p"] = {"bandwidth": p2p["bandwidth"], "latency_s": p2p["latency_s"]}
    device = {"peak_flops": {"fp32": comp["peak_flops"]},
              "achieved_flops": {"fp32": comp["achieved_flops"] or comp["peak_flops"]},
              "efficiency": (comp["achieved_flops"] or comp["peak_flops"]) / comp["peak_flops"],
              "overhead_per_layer_s": comp["overhead_per_layer_s"],
              "memory_bytes": raw["memory_per_device"] or 0, "memory_bandwidth": comp["memory_bandwidth"],
              "source": f"measured by hvdllm bench calibrate: peak = a {raw['compute'][0]['matmul_n']}^2 fp32 "
                        f"matrix product per rank with {raw['np']} ranks busy, achieved = the GPT's fit; "
                        f"memory = MemTotal / {raw['local_size']} ranks"}
    return {"about": f"measured on {raw['info']['host']} ({raw['info']['cores']} cores) by: {command}",
            "default_system": SYSTEM,
            "devices": {DEVICE: device}, "links": {LINK: link},
            "systems": {SYSTEM: {"device": DEVICE, "intra_node": LINK, "inter_node": LINK,
                                 "devices_per_node": raw["np"],
                                 "note": "one node measured: inter_node repeats the node's own link"}},
            "fits": {"compute": comp, "collectives": coll, "p2p": p2p}, "raw": raw}


def print_tables(cal: dict) -> None:
    fits = cal["fits"]
    comp = fits["compute"]
    print("\ncompute (forward + backward of the GPT; slowest rank)")
    common.print_table([{"batch": p["batch"], "tokens": p["tokens"], "gflop": p["flops"] / 1e9,
                         "ms": p["seconds"] * 1e3, "gflops": p["flops"] / p["seconds"] / 1e9}
                        for p in comp["points"]],
                       ["batch", "tokens", ("gflop", "GFLOP"), ("ms", "ms/step"), ("gflops", "GFLOP/s")])
    ach = comp["achieved_flops"]
    print(f"fit t = {comp['overhead_s'] * 1e3:.2f} ms + FLOPs / {ach / 1e9 if ach else float('nan'):.2f} GFLOP/s; "
          f"matmul peak {comp['peak_flops'] / 1e9:.2f} GFLOP/s; copy {comp['memory_bandwidth'] / 1e9:.2f} GB/s")
    if fits["collectives"]:
        print("\nHorovod collectives (slowest rank)")
        common.print_table([{"kind": k, "bytes": r["bytes"], "ms": r["seconds"] * 1e3} for k, v in
                            fits["collectives"].items() for r in v["rows"]], ["kind", "bytes", ("ms", "ms")])
        common.print_table([{"kind": k, "busbw": (v["busbw"] or float("nan")) / 1e9, "lat": v["latency_s"] * 1e6}
                            for k, v in fits["collectives"].items()],
                           ["kind", ("busbw", "busbw GB/s"), ("lat", "latency us")])
    if fits["p2p"]:
        p = fits["p2p"]
        print(f"\npoint-to-point (mpi/p2p, one way): {(p['bandwidth'] or float('nan')) / 1e9:.2f} GB/s, "
              f"latency {p['latency_s'] * 1e6:.1f} us")
    mem = cal["devices"][DEVICE]["memory_bytes"]
    print(f"memory per device: {mem / (1 << 30):.2f} GiB")


def main(argv=None) -> int:
    a = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        part = str(Path(tmp) / "calibrate.raw.json")
        cmd = worker_command(a, part)
        raw, rc, wall = common.run_worker(cmd, part, a.timeout, TAG, f"calibrate at np={a.np}")
    if raw is None:
        return rc
    command = "hvdllm bench calibrate " + shlex.join(argv or [])
    cal = calibration(raw, command.strip())
    cal["command"] = shlex.join(cmd)
    print_tables(cal)
    out = common.write_json(a.out, cal)
    print(f"\n{TAG} {wall:.1f} s; wrote {out}: use it with  hvdllm plan CONFIG --nodes 1 --devices-per-node "
          f"{a.np} --calibration {out}")
    return 0
