"""Build the real launcher command for `hvdllm launch` (printed, then run)."""
from __future__ import annotations

import os
import shutil
import sys

from .errors import LaunchError


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def command(launcher: str, np_: int, args: list[str], hosts: str | None = None) -> list[str]:
    """The argv that starts `np_` ranks of `python -m hvdllm <args>` under `launcher`."""
    prog = [sys.executable, "-m", "hvdllm", *args]
    if launcher == "mpirun":
        cmd = ["mpirun", "-np", str(np_), "--bind-to", "none", "-x", "OMPI_MCA_mpi_yield_when_idle=1"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if hosts:
            cmd += ["-H", hosts]
        elif np_ > _cores():
            cmd.append("--oversubscribe")
        return cmd + prog
    if launcher == "horovodrun":
        # horovodrun's own MPI mode is mpirun underneath; --gloo is what it adds.
        cmd = ["horovodrun", "-np", str(np_), "--gloo"]
        if hosts:
            cmd += ["-H", hosts]
        return cmd + prog
    if launcher == "srun":
        # Debian's Open MPI works with PMIx; --mpi=pmi2 fails there.
        return ["srun", "-n", str(np_), "--mpi=pmix", *prog]
    raise LaunchError(f"--launcher: {launcher!r} is not one of mpirun, horovodrun, srun")


def check_available(cmd: list[str]) -> None:
    exe = cmd[0]
    if shutil.which(exe) is None:
        hint = {"mpirun": "install an MPI (make env does) or `module load openmpi`",
                "horovodrun": "activate the environment that has Horovod (.venv/bin)",
                "srun": "run on a Slurm cluster, or use --launcher mpirun"}[exe]
        raise LaunchError(f"{exe} not found on PATH: {hint}")
