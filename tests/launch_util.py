"""Run a command under mpirun / horovodrun from a test, with a hard deadline (never hang CI)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
              "OMPI_MCA_mpi_yield_when_idle": "1", "PYTHONUNBUFFERED": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def mpirun_argv(np_: int) -> list[str]:
    return ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none",
            "-x", "OMPI_MCA_mpi_yield_when_idle=1", "-x", "PYTHONPATH",
            "-x", "TF_CPP_MIN_LOG_LEVEL"]


def horovodrun_argv(np_: int) -> list[str]:
    return [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_), "--gloo"]


def run(argv: list[str], timeout: float, cwd=ROOT, **extra_env) -> subprocess.CompletedProcess:
    """Run argv in its own process group; past `timeout` the whole group is killed and the
    test fails with what was printed, instead of hanging the suite."""
    p = subprocess.Popen(argv, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(argv)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(argv, p.returncode, out, "")


def hvdllm(np_: int, args: list[str], timeout: float = 300, launcher: str = "mpirun", **extra_env):
    prog = [sys.executable, "-m", "hvdllm", *args]
    pre = mpirun_argv(np_) if launcher == "mpirun" else horovodrun_argv(np_)
    return run(pre + prog, timeout, **extra_env)
