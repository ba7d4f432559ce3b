"""Build the real launcher command for `hvdllm launch` (printed, then run), or for Slurm's
sbatch the job script that runs the ranks with srun."""
from __future__ import annotations

import os
import shlex
import shutil
import sys

from .errors import LaunchError
from .runtime import cores


def command(launcher: str, np_: int, args: list[str], hosts: str | None = None, *,
            module: str = "hvdllm", env: list[str] | tuple = (), pin: bool = False) -> list[str]:
    """The argv that starts `np_` ranks of `python -m <module> <args>` under `launcher` (the
    benchmarks start their workers through it too). `env`: variables every rank gets, `KEY`
    (this process's value) or `KEY=VALUE`. `pin` (mpirun): each rank bound to one core, ranks
    sharing cores when there are more ranks than cores (a benchmark's straggler then cannot
    borrow another rank's core); otherwise ranks float, which suits ranks with several threads."""
    prog = [sys.executable, "-m", module, *args]
    if launcher == "mpirun":
        bind = ["--map-by", "core", "--bind-to", "core:overload-allowed"] if pin else ["--bind-to", "none"]
        cmd = ["mpirun", "-np", str(np_), *bind, "-x", "OMPI_MCA_mpi_yield_when_idle=1"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if hosts:
            cmd += ["-H", hosts]
        elif np_ > cores():
            cmd.append("--oversubscribe")
        for kv in env:  # mpirun forwards only what -x names to ranks on other hosts
            cmd += ["-x", kv]
        return cmd + prog
    if launcher == "horovodrun":
        # horovodrun's own MPI mode is mpirun underneath; --gloo is what it adds.
        if any("=" in kv for kv in env):
            raise LaunchError(f"horovodrun passes this shell's environment only: export {', '.join(env)} "
                              f"before the launch")
        cmd = ["horovodrun", "-np", str(np_), "--gloo"]
        if hosts:
            cmd += ["-H", hosts]
        return cmd + prog
    if launcher == "srun":
        # Debian's Open MPI works with PMIx; --mpi=pmi2 fails there. Without --kill-on-bad-exit
        # a rank that dies at start-up leaves the others waiting in MPI_Init until the time limit.
        sets = [kv for kv in env if "=" in kv]
        export = [f"--export=ALL,{','.join(sets)}"] if sets else []
        return ["srun", "-n", str(np_), "--mpi=pmix", "--kill-on-bad-exit=1", *export, *prog]
    raise LaunchError(f"--launcher: {launcher!r} is not one of mpirun, horovodrun, srun, sbatch")


def job_script(np_: int, args: list[str], nodes: int | None = None, time_limit: str | None = None,
               partition: str | None = None, job_name: str = "hvdllm", signal_before: int = 120,
               requeue: bool = False) -> str:
    """A batch script for `sbatch`: NP tasks started by srun with PMIx. The submitting shell's
    environment (the venv's PATH, module loads) travels with the job: sbatch's default
    --export=ALL. With a time limit, Slurm sends SIGUSR1 `signal_before` seconds before it, and
    the trainers stop with a checkpoint (hvdllm/stop.py, train.stop_signal). With `requeue`
    the script requeues the job when the trainers stopped that way (exit 75), and the run always
    resumes from its latest checkpoint: a long training runs as a chain of time-limited jobs."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --ntasks={np_}",
             "#SBATCH --output=%x-%j.out"]
    if nodes:
        lines.append(f"#SBATCH --nodes={nodes}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
        if signal_before > 0:
            lines.append(f"#SBATCH --signal=USR1@{signal_before}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if requeue:
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
        if args[:1] == ["train"]:
            args = [*args, "--set", "train.resume=true"]
    run = " ".join(shlex.quote(a) for a in command("srun", np_, args))
    body = ["# Open MPI busy-polls while it waits; with a rank per core that starves compute.",
            "export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}"]
    if not requeue:
        return "\n".join(lines + body + [f"exec {run}", ""])
    return "\n".join(lines + body + [
        run, "rc=$?",
        "# 75: the trainers stopped with a checkpoint before the time limit (hvdllm/stop.py)",
        'if [ "$rc" -eq 75 ]; then',
        '  echo "[hvdllm] job $SLURM_JOB_ID stopped with a checkpoint: requeued, it resumes from there"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"', ""])


def check_available(cmd: list[str]) -> None:
    exe = cmd[0]
    if shutil.which(exe) is None:
        hint = {"mpirun": "install an MPI (make env does) or `module load openmpi`",
                "horovodrun": "activate the environment that has Horovod (.venv/bin)",
                "srun": "run on a Slurm cluster, or use --launcher mpirun",
                "sbatch": "run on a Slurm cluster (scripts/slurm_local.sh starts one here), or use "
                          "--launcher mpirun"}[exe]
        raise LaunchError(f"{exe} not found on PATH: {hint}")
