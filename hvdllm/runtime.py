"""Process start-up and tear-down: which launcher started us, Horovod over MPI or Gloo, and the
rules that keep a job from hanging (deadlines, one failed rank ends every rank).

Launchers: `mpirun`/`srun` (MPI; Horovod is initialised on mpi4py's COMM_WORLD so mpi4py
point-to-point and Horovod collectives share one job), `horovodrun --gloo` (no MPI at all), or
a plain `python`/`hvdllm` call (a one-rank MPI singleton).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from .errors import USER_ERRORS, LaunchError, PeerTimeout

# Open MPI busy-polls by default; with as many ranks as cores that starves compute (measured:
# 2.8-3.1 s vs 1.8-2.0 s per step at np=2 on 2 cores). Horovod stall checks turn a rank that
# never joins a collective into an error instead of a silent hang.
DEFAULT_ENV = {
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "180",
}


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count): the one
    place that decides threads per rank and whether mpirun must oversubscribe."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_rank() -> int:
    """This process's rank from the launcher's environment, known before any initialisation."""
    for key in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def detect_launcher(env=os.environ) -> str:
    if env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        return "gloo"
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE")):
        return "mpi"
    return "single"


@dataclass
class Runtime:
    launcher: str
    rank: int
    size: int
    local_rank: int
    local_size: int
    comm: object = None  # mpi4py COMM_WORLD, or None under Gloo
    process_sets: dict = None  # {tuple(ranks): Horovod ProcessSet} registered at init

    def process_set(self, ranks):
        """The Horovod process set for exactly these ranks (None = the global set)."""
        ranks = tuple(ranks)
        if len(ranks) == self.size:
            return None
        if not self.process_sets or ranks not in self.process_sets:
            raise AssertionError(f"no process set registered for ranks {ranks}")
        return self.process_sets[ranks]

    def require_mpi(self, what: str):
        """Strategies built on point-to-point call this: a clear error instead of a hang."""
        if self.comm is None:
            raise LaunchError(f"{what} needs MPI, but this job was started by "
                              f"horovodrun --gloo. Launch with mpirun or srun (hvdllm launch "
                              f"--launcher mpirun), or choose a strategy without it.")


def start(backend, agg_cfg=None, groups=()) -> Runtime:
    """Initialise MPI (when present) and Horovod through `backend.init_horovod(comm, groups)`;
    `groups` are the rank groups (from the Layout) that need their own Horovod process set."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if agg_cfg is not None:
        from .aggregation import apply_horovod_env
        apply_horovod_env(agg_cfg)
    launcher = detect_launcher()
    comm = None
    if launcher in ("mpi", "single"):
        from mpi4py import MPI  # deferred so Gloo jobs never initialise MPI
        comm = MPI.COMM_WORLD
    rank, size, local_rank, local_size, sets = backend.init_horovod(comm, groups)
    rt = Runtime(launcher, rank, size, local_rank, local_size, comm, sets)
    _install_signal_handlers(rt)
    return rt


# ---------------------------------------------------------------------------------------------
# Failure: say what happened on every rank, then end the whole job.

def fail(rt: Runtime | None, exc: BaseException, code: int | None = None) -> None:
    """Print one clear message and end every rank. Never returns."""
    rank = rt.rank if rt else env_rank()
    code = code if code is not None else getattr(exc, "exit_code", 1)
    if isinstance(exc, USER_ERRORS):
        msg = str(exc)
    else:
        msg = "".join(traceback.format_exception(exc)).rstrip()
    sys.stderr.write(f"\n[hvdllm] rank {rank} failed: {msg}\n"
                     f"[hvdllm] rank {rank}: ending every rank of the job (exit {code}).\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if rt is not None and rt.comm is not None and rt.size > 1:
        rt.comm.Abort(code)  # mpirun/srun then stop the others; they print why (SIGTERM handler)
    if rt is None and detect_launcher() == "mpi":   # failed before start-up finished: MPI ends the rest
        try:
            from mpi4py import MPI
            if MPI.COMM_WORLD.Get_size() > 1:
                MPI.COMM_WORLD.Abort(code)
        except Exception:  # no usable MPI here: the launcher sees the exit code
            pass
    os._exit(code)           # Gloo: horovodrun ends the others when one rank exits non-zero


def run_guarded(start, body):
    """`rt = start(); body(rt)` -> (rt, result). Any exception on this rank, before or after
    Horovod started, ends every rank with its message (`fail`); a clean SystemExit passes."""
    rt = None
    try:
        rt = start()
        return rt, body(rt)
    except BaseException as e:  # one rank's failure must end every rank, never hang
        if isinstance(e, SystemExit) and not e.code:
            raise
        fail(rt, e)


def _install_signal_handlers(rt: Runtime) -> None:
    def on_term(signum, frame):
        sys.stderr.write(f"[hvdllm] rank {rt.rank}: stopped by signal {signum} (another rank failed "
                         f"or the job was cancelled; see the first [hvdllm] message).\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, on_term)
        except ValueError:  # not the main thread (e.g. under a test runner thread)
            pass
    faulthandler.enable()


class Watchdog:
    """A deadline on anything that waits on other ranks: past it, the job ends with a message.

    `with wd.deadline(seconds, "step 12"): ...` — a daemon thread checks once a second.
    """

    def __init__(self, rt: Runtime | None):
        self.rt = rt
        self._what = None
        self._until = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="hvdllm-watchdog")
        self._thread.start()

    def _run(self):
        while True:
            time.sleep(1.0)
            until, what = self._until, self._what
            if until is not None and time.monotonic() > until:
                fail(self.rt, PeerTimeout(f"{what} did not finish within its deadline; a rank is "
                                          f"lost or stuck. Raise train.step_timeout if the work is "
                                          f"legitimately this slow."))

    def deadline(self, seconds: float, what: str):
        wd = self

        class _Ctx:
            def __enter__(self):
                wd._what, wd._until = what, time.monotonic() + seconds

            def __exit__(self, *exc):
                wd._until = None
        return _Ctx()
