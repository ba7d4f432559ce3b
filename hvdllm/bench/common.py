"""What the benchmarks share. A benchmark is a driver (`hvdllm bench NAME`, hvdllm/bench/NAME.py:
options, launches, tables, JSON) and a worker (NAME_worker.py: one rank of the job the driver
launches through hvdllm.launch; rank 0 writes the raw JSON the driver reads).

Timing rules used throughout:
- warm-up steps are run and thrown away (first calls compile, allocate and fill caches);
- the reported figure is the median of per-step wall times (robust to a stray slow step);
- variants compared against each other are measured interleaved in rounds (A B C A B C ...) in
  one process, so drift (other load on the machine, thermal, page cache) hits all of them alike;
- a step's time is its slowest rank's (a step with collectives ends when its last rank is done);
- while rank 0 times a baseline alone, the other ranks sleep in a non-blocking barrier: spinning
  in a blocking one would take the cores the baseline is measured on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from hvdllm import backends
from hvdllm.errors import PeerTimeout
from hvdllm.launch import check_available, command
from hvdllm.runtime import cores

clock = time.perf_counter
ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20
# name: (n_layer, n_embd, n_head, block_size, vocab_size, sequences per rank)
GPT_MODELS = {
    "tiny": (2, 32, 2, 32, 256, 4),     # smoke tests only
    "small": (4, 256, 4, 128, 256, 8),
    "medium": (6, 384, 6, 128, 256, 8),
    "large": (8, 512, 8, 128, 256, 8),
}


def proc_status(key: str, pid="self") -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM, RssAnon) in bytes; KeyError where it is absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def say(tag: str, msg: str) -> None:
    print(f"{tag} {msg}", file=sys.stderr, flush=True)


def med(ts) -> float:
    return statistics.median(ts) if ts else math.nan


# ---------------------------------------------------------------------------------------------
# drivers: options, one worker job, tables, JSON

def env_pair(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return text


def add_env_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", type=env_pair,
                   help="environment for the ranks, forwarded with mpirun -x (e.g. HOROVOD_CYCLE_TIME=1)")


def add_timing_options(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps per variant first")
    p.add_argument("--per-round", type=int, default=1,
                   help="steps of one variant before switching to the next (default 1: every round "
                        "runs each variant once, so a drifting machine load hits all alike)")


def add_output_options(p: argparse.ArgumentParser, name: str, timeout: float = 1200, plot: bool = True) -> None:
    p.add_argument("--timeout", type=float, default=timeout, help="seconds one mpirun may take")
    p.add_argument("--out", default=f"runs/bench/{name}.json",
                   help="JSON output; the PNG goes next to it" if plot else "JSON output")
    if plot:
        p.add_argument("--no-plot", action="store_true")


def backend_list(p: argparse.ArgumentParser, text: str, option: str = "--backends") -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in backends.MODULES]
    if bad or not names:
        p.error(f"{option}: {bad or names} not among {', '.join(backends.MODULES)}")
    return names


def worker_command(module: str, np_: int, argv: Iterable, env: Sequence[str] = (), pin: bool = False) -> list[str]:
    """The mpirun argv of one job: hvdllm's own launcher command, with the repository on the
    ranks' PYTHONPATH and `env` (KEY=VALUE) forwarded; `pin`: each rank bound to a core."""
    return command("mpirun", np_, [str(a) for a in argv], module=module,
                   env=["PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", *env], pin=pin)


def launch_env() -> dict:
    """The environment a bench's mpirun runs in: the repository importable by the ranks, their
    output unbuffered (progress lines arrive as they happen), TensorFlow's start-up chatter off."""
    e = dict(os.environ)
    pp = e.get("PYTHONPATH", "")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


def launch(cmd: list[str], timeout: float, tag: str, quiet: bool = False, log: Path | None = None) -> tuple[int, str]:
    """Run one job in its own process group and kill the whole group past `timeout` (a stuck
    rank never hangs the benchmark). Output goes to ours, or to `log`, or (`quiet`) is kept;
    returns (exit code, the kept output's or the log's tail)."""
    out_file = open(log, "w") if log else None
    p = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), start_new_session=True,
                         stdout=out_file or (subprocess.PIPE if quiet else None),
                         stderr=subprocess.STDOUT if (quiet or log) else None, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        say(tag, f"timed out after {timeout:.0f} s; killed")
        p.returncode = 124
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    finally:
        if out_file:
            out_file.close()
    if log:
        out = Path(log).read_text(errors="replace")
    return p.returncode, (out or "")[-4000:]


def run_worker(cmd: list[str], part: str | os.PathLike, timeout: float, tag: str, label: str,
               wait_quiet: float = 0.0) -> tuple[dict | None, int, float]:
    """Print `cmd`, run it and read the JSON its rank 0 wrote to `part`: (that result, exit code,
    wall seconds); the result is None when the job failed, which is said."""
    check_available(cmd)  # a clear error when mpirun is missing
    say(f"\n{tag}", f"{label}:\n  {shlex.join(cmd)}")
    part = Path(part)
    part.unlink(missing_ok=True)
    if wait_quiet > 0:
        busy = wait_for_quiet(wait_quiet, say=lambda m: say(tag, m))
        if busy is not None:
            say(tag, f"other processes keep {busy:.1f} cores busy at the start")
    t0 = clock()
    rc, _ = launch(cmd, timeout, tag)
    if rc != 0 or not part.exists():
        say(tag, f"{label} FAILED (exit {rc})")
        return None, rc or 1, clock() - t0
    return read_json(part), 0, clock() - t0


def save_figure(plt, fig, path: Path, **layout) -> Path:
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def warn_if_busy(tag: str, foreign: float | None) -> None:
    if foreign is not None and foreign > 0.2:
        say(tag, f"warning: other processes kept {foreign:.1f} of {cores()} cores busy during this "
                 f"run: times are inflated and noisier")


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


ABOVE = "!"
ABOVE_NOTE = f"{ABOVE} above the rank count: a measurement to explain, not a result"


def format_table(rows: Iterable[Mapping], columns: Sequence[str | tuple[str, str]],
                 limits: Mapping[str, object] | None = None) -> str:
    """A plain-text table. `columns` are keys, or (key, header) pairs; numbers right-aligned.
    `limits` {key: bound, or a function of the row returning it (None: none)}: a value above its
    bound -- a speed-up above the rank count, an efficiency above 1 -- is impossible for the
    thing measured, so it is marked and a footnote says so."""
    rows, limits, marked = list(rows), limits or {}, []
    cols = [(c, c) if isinstance(c, str) else c for c in columns]

    def cell(row, key):
        text = fmt(row.get(key))
        if key not in limits:
            return text
        bound = limits[key](row) if callable(limits[key]) else limits[key]
        v = row.get(key)
        over = bound is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v > bound
        marked.append(over)
        return text + (ABOVE if over else " ")
    cells = [[cell(row, key) for key, _ in cols] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for key, _ in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h) in enumerate(cols)]

    def line(values, is_header=False):
        out = []
        for v, w, num in zip(values, widths, numeric):
            out.append(v.rjust(w) if num and not is_header else v.ljust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line([h for _, h in cols], True), sep] + [line(r) for r in cells]
                     + ([ABOVE_NOTE] if any(marked) else []))


def print_table(rows: Iterable[Mapping], columns: Sequence[str | tuple[str, str]],
                limits: Mapping[str, object] | None = None, file=None) -> str:
    """Print (and return) format_table(rows, columns, limits)."""
    text = format_table(list(rows), columns, limits)
    print(text, file=file or sys.stdout, flush=True)
    return text


def pyplot(tag: str):
    """matplotlib's pyplot on the file-only backend, or None (said) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        say(tag, "matplotlib not installed: no plot")
        return None


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


# ---------------------------------------------------------------------------------------------
# workers: start-up, models, batches

def worker_parser(module: str, doc: str, choices: Sequence[str] = tuple(backends.MODULES),
                  default: str | None = None, steps: int = 0, warmup: int = 0) -> argparse.ArgumentParser:
    """A worker's parser with the options every driver passes: backend, threads, seed, out (and
    with `steps`, the timing options)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if steps:
        add_timing_options(p, steps, warmup)
    p.add_argument("--backend", default=default, required=default is None, choices=list(choices))
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="", help="JSON written by rank 0")
    return p


def worker_main(args, body: Callable, *, what: str, min_ranks: int = 1, agg_cfg=None,
                groups: Callable[[], list] | None = None) -> int:
    """A worker process: the backend `args.backend` (threads set first: TF fixes its pools at its
    first op), Horovod over MPI, `body(rt, backend)` on every rank; what it returns on rank 0 is
    written to args.out. A failure on any rank ends every rank (runtime.run_guarded)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hvdllm import runtime
    backend = backends.load(args.backend)
    if getattr(args, "threads", None):
        backend.configure(args.threads, args.seed)

    def run(rt):
        rt.require_mpi(what)
        if rt.size < min_ranks:
            raise ValueError(f"{what} needs at least {min_ranks} ranks (mpirun -np N, N >= {min_ranks})")
        return body(rt, backend)
    _, result = runtime.run_guarded(
        lambda: runtime.start(backend, agg_cfg, groups() if groups else ()), run)
    if result is not None and args.out:
        write_json(args.out, result)
    return 0


def gpt_config(shape: Sequence[int], seed: int = 1337, threads: int = 1):
    """The hvdllm Config of a benchmark GPT: shape = (n_layer, n_embd, n_head, block_size,
    vocab_size, sequences per rank), no dropout (every variant must do the same arithmetic)."""
    from hvdllm.config import Config
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, _ = shape
    m.dropout = 0.0
    cfg.train.batch_size, cfg.train.seed, cfg.train.threads = shape[5], seed, threads
    return cfg


def model_shape(m) -> dict:
    return {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "block_size": m.block_size,
            "vocab_size": m.vocab_size}


def random_batches(cfg, rng, n: int = 4) -> list[tuple]:
    """n random (x, y) int64 token batches of cfg.train.batch_size sequences."""
    import numpy as np
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    out = []
    for _ in range(n):
        toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])))
    return out


def cycle(batches) -> Callable[[], tuple]:
    """The batches in turn, one per call, round and round."""
    state = {"i": 0}

    def nxt():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b
    return nxt


def run_info() -> dict:
    """Where a worker ran: host, cores, and the environment that changes Horovod's and MPI's speed."""
    return {"host": platform.node(), "cores": cores(),
            "env": {k: os.environ[k] for k in sorted(os.environ)
                    if k.startswith(("HOROVOD_", "OMPI_MCA_")) or k in ("OMP_NUM_THREADS",)}}


# ---------------------------------------------------------------------------------------------
# workers: measuring across ranks

class Ranks:
    """mpi4py helpers over the job's communicator: barriers, gathers, slowest-rank times."""

    def __init__(self, comm, timeout_s: float = 600.0):
        self.comm, self.timeout_s = comm, timeout_s
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def barrier(self):
        self.comm.Barrier()

    def idle(self, what: str = "a rank's solo measurement"):
        """A barrier that sleeps while it waits (5 ms doubling to 50 ms between polls), with a
        deadline: for ranks that have nothing to do while another rank is being timed. A blocking
        barrier follows, which every rank reaches within one poll, so they leave it together."""
        req, nap = self.comm.Ibarrier(), 0.005
        deadline = time.monotonic() + self.timeout_s
        while not req.Test():
            if time.monotonic() > deadline:
                raise PeerTimeout(f"{what} did not end within {self.timeout_s:.0f} s: a rank is lost or stuck")
            time.sleep(nap)
            nap = min(2 * nap, 0.05)
        self.comm.Barrier()

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def total(self, x: float) -> float:
        """Sum over ranks, on every rank."""
        return self.comm.allreduce(x)

    def slowest(self, times: dict[str, list[float]]) -> dict[str, list[float]] | None:
        """On rank 0, per call of each variant, the slowest rank's time."""
        every = self.gather(times)
        if self.rank != 0:
            return None
        return {k: [max(ts) for ts in zip(*(t[k] for t in every))] for k in times}

    def measured(self, body: Callable[[], object]) -> tuple[object, float | None]:
        """body() between barriers; (its result, the cores other processes kept busy meanwhile)."""
        self.barrier()
        c0 = cpu_snapshot()
        out = body()
        self.barrier()
        c1 = cpu_snapshot()
        return out, foreign_cores(c0, c1, self.total(c1["self_s"] - c0["self_s"]))


def rounds_for(steps: int, per_round: int) -> list[int]:
    """Split `steps` timed steps into rounds of at most `per_round` (the last may be shorter)."""
    per_round = max(1, per_round)
    full, rest = divmod(max(0, steps), per_round)
    return [per_round] * full + ([rest] if rest else [])


def interleaved(fns: Mapping[str, Callable[[], object] | None], steps: int, warmup: int = 1,
                per_round: int = 5, *, before: Callable[[], None] | None = None,
                solo: Sequence[str] = (), idle: Callable[[], None] | None = None,
                after_warmup: Callable[[], None] | None = None,
                progress: str | None = None) -> dict[str, list[float]]:
    """Time every fn `steps` times, interleaved: round r runs each variant for `per_round` steps
    in turn (A A A, B B B, C C C, then again), after `warmup` untimed steps of each.

    Every variant sees the same number of rounds and switches, so slow phases of the machine and
    the cost of switching models in and out of cache fall on all of them equally.
    `before()` runs untimed before each variant's turn (a barrier: ranks start it together). A variant
    named in `solo` runs only where its fn is not None (rank 0): after its warm-up and each of its
    turns every rank calls `idle()`, a barrier the waiting ranks sleep in. `after_warmup()` runs
    once, untimed, before the first round (e.g. to compare the variants' states); `progress`, a
    tag, prints a line after each round. Returns {name: [seconds per step, in order]}.
    """
    def turn(name, fn, k, times=None):
        if before is not None:
            before()
        for _ in range(k if fn is not None else 0):
            t0 = clock()
            fn()
            if times is not None:
                times.append(clock() - t0)
        if name in solo and idle is not None:
            idle()
    for name, fn in fns.items():
        turn(name, fn, warmup)
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {name: [] for name in fns}
    plan, t_run = rounds_for(steps, per_round), clock()
    for r, k in enumerate(plan, 1):
        for name, fn in fns.items():
            turn(name, fn, k, times[name])
        if progress:
            say(progress, f"round {r}/{len(plan)} done ({clock() - t_run:.1f} s)")
    return times


def step_stats(per_rank: list[list[float]]) -> dict:
    """summarize() of the slowest rank's time per step, with every rank's median and those times."""
    slowest = [max(ts) for ts in zip(*per_rank)]
    return {**summarize(slowest), "rank_medians_s": [med(ts) for ts in per_rank], "step_times_s": slowest}


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


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3, sample_s: float = 2.0,
                   say: Callable[[str], None] | None = None) -> float | None:
    """Wait (at most max_wait_s) until other processes keep fewer than `threshold` cores busy;
    return the last reading. For benchmarks on shared machines: call it between launches."""
    def busy_cores():
        a = cpu_snapshot()
        time.sleep(sample_s)
        b = cpu_snapshot()
        return foreign_cores(a, b, b["self_s"] - a["self_s"])
    deadline = clock() + max_wait_s
    busy = busy_cores()
    told = False
    while busy is not None and busy >= threshold and clock() < deadline:
        if say and not told:
            say(f"other processes keep {busy:.1f} cores busy; waiting up to "
                f"{max_wait_s:.0f} s for the machine to quieten")
            told = True
        time.sleep(max(0.0, min(10.0, deadline - clock())))
        busy = busy_cores()
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
