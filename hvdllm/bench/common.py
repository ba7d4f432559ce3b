"""Helpers shared by the benchmarks: timing, interleaved measurement, tables, JSON.

Timing rules used throughout:
- warm-up steps are run and thrown away (first calls compile, allocate and fill caches);
- the reported figure is the median of per-step wall times (robust to a stray slow step);
- variants compared against each other are measured interleaved in rounds (A B C A B C ...) in
  one process, so drift (other load on the machine, thermal, page cache) hits all of them alike.
"""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

clock = time.perf_counter


def median_time(fn: Callable[[], object], steps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Run fn `warmup` times untimed, then `steps` times timed; (median seconds, every time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times), times


def rounds_for(steps: int, per_round: int) -> list[int]:
    """Split `steps` timed steps into rounds of at most `per_round` (the last may be shorter)."""
    per_round = max(1, per_round)
    full, rest = divmod(max(0, steps), per_round)
    return [per_round] * full + ([rest] if rest else [])


def interleaved(fns: Mapping[str, Callable[[], object]], steps: int, warmup: int = 1,
                per_round: int = 5, on_round: Callable[[int, int], None] | None = None,
                before_round: Callable[[], None] | None = None,
                after_warmup: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time every fn `steps` times, interleaved: round r runs each variant for `per_round` steps
    in turn (A A A, B B B, C C C, then again), after `warmup` untimed steps of each.

    Every variant sees the same number of rounds and switches, so slow phases of the machine and
    the cost of switching models in and out of cache fall on all of them equally.
    `before_round()` runs untimed at each round's start (e.g. a barrier, so ranks stay aligned);
    `on_round(r, n_rounds)` after each round (progress); `after_warmup()` once, untimed, between
    the warm-up and the first round (e.g. to compare the variants' states).
    Returns {name: [seconds per step, in order]}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {name: [] for name in fns}
    plan = rounds_for(steps, per_round)
    for r, k in enumerate(plan):
        for name, fn in fns.items():
            if before_round is not None:
                before_round()
            for _ in range(k):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        if on_round is not None:
            on_round(r + 1, len(plan))
    return times


def cpu_snapshot() -> dict:
    """Machine-wide busy CPU seconds (Linux /proc/stat; None elsewhere), this process's CPU
    seconds (every thread) and a wall clock: two snapshots tell how busy others kept the machine."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    busy = None
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        busy = (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return {"busy_s": busy, "self_s": ru.ru_utime + ru.ru_stime, "wall_s": time.monotonic()}


def foreign_cores(a: dict, b: dict, own_cpu_s: float) -> float | None:
    """Average cores kept busy by processes other than ours between snapshots a and b, where
    own_cpu_s is the CPU time our processes used meanwhile (0 on a quiet machine; the launcher's
    own small overhead counts as foreign)."""
    if a["busy_s"] is None or b["busy_s"] is None:
        return None
    wall = b["wall_s"] - a["wall_s"]
    return max(0.0, (b["busy_s"] - a["busy_s"] - own_cpu_s) / wall) if wall > 0 else None


def busy_cores(sample_s: float = 2.0) -> float | None:
    """Cores kept busy machine-wide over the next `sample_s` seconds (None off Linux)."""
    a = cpu_snapshot()
    time.sleep(sample_s)
    b = cpu_snapshot()
    return foreign_cores(a, b, b["self_s"] - a["self_s"])


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3, sample_s: float = 2.0,
                   say: Callable[[str], None] | None = None) -> float | None:
    """Wait (at most max_wait_s) until other processes keep fewer than `threshold` cores busy;
    return the last reading. For benchmarks on shared machines: call it between launches."""
    deadline = clock() + max_wait_s
    busy = busy_cores(sample_s)
    told = False
    while busy is not None and busy >= threshold and clock() < deadline:
        if say and not told:
            say(f"other processes keep {busy:.1f} cores busy; waiting up to "
                f"{max_wait_s:.0f} s for the machine to quieten")
            told = True
        time.sleep(max(0.0, min(10.0, deadline - clock())))
        busy = busy_cores(sample_s)
    return busy


def summarize(times: Sequence[float]) -> dict:
    """Median, quartiles, min, max and count of a list of step times (seconds)."""
    ts = sorted(times)
    if not ts:
        return {"median_s": math.nan, "p25_s": math.nan, "p75_s": math.nan, "min_s": math.nan,
                "max_s": math.nan, "n": 0}
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "min_s": ts[0],
            "max_s": ts[-1], "n": len(ts)}


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1e3:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 1e2 else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Iterable[Mapping], columns: Sequence[str | tuple[str, str]]) -> str:
    """A plain-text table. `columns` are keys, or (key, header) pairs; numbers right-aligned."""
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    cells = [[fmt(row.get(key)) for key, _ in cols] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for key, _ in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h) in enumerate(cols)]

    def line(values, is_header=False):
        out = []
        for v, w, num in zip(values, widths, numeric):
            out.append(v.rjust(w) if num and not is_header else v.ljust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line([h for _, h in cols], True), sep] + [line(r) for r in cells])


def print_table(rows: Iterable[Mapping], columns: Sequence[str | tuple[str, str]], file=None) -> str:
    """Print (and return) format_table(rows, columns)."""
    text = format_table(list(rows), columns)
    print(text, file=file or sys.stdout, flush=True)
    return text


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write obj as indented JSON (NaN/inf become null), atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


# launching -------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mpirun(np_: int, env: list[str]) -> list[str]:
    """mpirun argv for a bench worker: no binding, yielding MPI, extra `-x KEY=VALUE`s."""
    cmd = ["mpirun", "-np", str(np_), "--bind-to", "none", "-x", "OMPI_MCA_mpi_yield_when_idle=1",
           "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL"]
    if np_ > cores():
        cmd.append("--oversubscribe")
    for kv in env:
        cmd += ["-x", kv]
    return cmd


def launch_env() -> dict:
    """The environment a bench's mpirun runs in (repo on PYTHONPATH, root allowed in containers)."""
    e = dict(os.environ)
    pp = e.get("PYTHONPATH", "")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    e.setdefault("PYTHONUNBUFFERED", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers / CI run as root
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return e


def launch(cmd: list[str], timeout: float, quiet: bool = False, tag: str = "[bench]") -> tuple[int, str]:
    """Run one mpirun in its own process group; kill the whole group past `timeout`.
    Returns (exit code, the output's tail when `quiet`, else '' as it went straight to ours)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), start_new_session=True,
                         stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, (out or "")[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        print(f"{tag} timed out after {timeout:.0f} s; killed", file=sys.stderr, flush=True)
        return 124, (out or "")[-4000:]
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
