"""Build the real launcher command for `hvdllm launch` (printed, then run), or for Slurm's
sbatch the job script that runs the ranks with srun; with --max-restarts, run it again from the
latest checkpoint when a rank dies."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
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
               requeue: bool = False, max_restarts: int = 0) -> str:
    """A batch script for `sbatch`: NP tasks started by srun with PMIx. The submitting shell's
    environment (the venv's PATH, module loads) travels with the job: sbatch's default
    --export=ALL. With a time limit, Slurm sends SIGUSR1 `signal_before` seconds before it, and
    the trainers stop with a checkpoint (hvdllm/stop.py, train.stop_signal). With `requeue`
    the script requeues the job when the trainers stopped that way (exit 75), and the run always
    resumes from its latest checkpoint: a long training runs as a chain of time-limited jobs.
    With `max_restarts` the script runs srun again, inside the same allocation, when the step
    ends with a code that means a rank died or failed (not 0, 2, 75 or 130: RESTART_NOT), up to
    that many times, each again resuming from the latest checkpoint; $HVDLLM_ATTEMPT counts."""
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
    if not requeue and not max_restarts:
        return "\n".join(lines + body + [f"exec {run}", ""])
    steps = [run, "rc=$?"] if not max_restarts else _restart_loop(np_, args, max_restarts)
    if not requeue:
        return "\n".join(lines + body + steps + ['exit "$rc"', ""])
    return "\n".join(lines + body + steps + [
        "# 75: the trainers stopped with a checkpoint before the time limit (hvdllm/stop.py)",
        'if [ "$rc" -eq 75 ]; then',
        '  echo "[hvdllm] job $SLURM_JOB_ID stopped with a checkpoint: requeued, it resumes from there"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"', ""])


def _restart_loop(np_: int, args: list[str], max_restarts: int) -> list[str]:
    """The job script's srun, run again (resuming) while it ends as a lost rank does."""
    first = " ".join(shlex.quote(a) for a in command("srun", np_, args, env=[ATTEMPT_ENV]))
    again = " ".join(shlex.quote(a) for a in command("srun", np_, resume_args(args), env=[ATTEMPT_ENV]))
    stop = "|".join(str(c) for c in sorted(RESTART_NOT))
    return [
        "# --max-restarts: a step that ends because a rank died runs again from the latest checkpoint",
        f"export {ATTEMPT_ENV}=0",
        "while :; do",
        f'  if [ "${ATTEMPT_ENV}" -eq 0 ]; then {first}; else {again}; fi',
        "  rc=$?",
        f'  case "$rc" in {stop}) break ;; esac',
        f'  if [ "${ATTEMPT_ENV}" -ge {max_restarts} ]; then',
        f'    echo "[hvdllm] attempt $(({ATTEMPT_ENV} + 1)) ended with exit $rc; no restart left '
        f'(--max-restarts {max_restarts})"',
        "    break",
        "  fi",
        f"  export {ATTEMPT_ENV}=$(({ATTEMPT_ENV} + 1))",
        f'  echo "[hvdllm] attempt ${ATTEMPT_ENV} ended with exit $rc (a rank died or failed): restarting from '
        f'the latest checkpoint, restart ${ATTEMPT_ENV} of {max_restarts}"',
        "done"]


# ---------------------------------------------------------------------------------------------
# --max-restarts: a job whose rank died runs again, resuming from the latest checkpoint

ATTEMPT_ENV = "HVDLLM_ATTEMPT"   # 0 on the first attempt (and without restarts), then 1, 2, ...
# exit codes a restart cannot help: success, a configuration error (it would fail alike; the
# message says what to fix), stopped with a checkpoint on train.stop_signal (75: the time limit
# or an operator's request, which --requeue handles), interrupted from the keyboard
RESTART_NOT = {0: "done", 2: "a configuration error", 75: "stopped with a checkpoint on train.stop_signal",
               130: "interrupted"}


def attempt() -> int:
    """This process's attempt under `hvdllm launch --max-restarts` (0: the first, or no restarts)."""
    v = os.environ.get(ATTEMPT_ENV, "0")
    return int(v) if v.isdigit() else 0


def resume_args(args: list[str]) -> list[str]:
    """A train command that resumes from the latest checkpoint in its out_dir."""
    if args[:1] != ["train"] or "train.resume=true" in args:
        return list(args)
    return [*args, "--set", "train.resume=true"]


def exit_reason(rc: int) -> str:
    """What a launcher's exit code says (mpirun: 128 + the signal that killed a rank)."""
    sig = -rc if rc < 0 else rc - 128 if 128 < rc < 160 else None
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"exit {rc}: a rank was killed by {name}"
    return RESTART_NOT.get(rc, f"exit {rc}: a rank failed")


def run_with_restarts(make_command, args: list[str], max_restarts: int, run=None, log=None) -> int:
    """Run make_command(args) and, while it ends with a code a restart can help (not in
    RESTART_NOT), run make_command(resume_args(args)) again, up to max_restarts times. Each
    attempt gets HVDLLM_ATTEMPT in its environment (make_command forwards it to the ranks).
    Returns the last attempt's exit code."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    for k in range(max_restarts + 1):
        cmd = make_command(args if k == 0 else resume_args(args))
        env = {**os.environ, ATTEMPT_ENV: str(k)}
        log(f"[hvdllm] running{f' (attempt {k + 1} of {max_restarts + 1})' if max_restarts else ''}: "
            + " ".join(cmd))
        rc = run(cmd, env) if run else subprocess.call(cmd, env=env)
        if rc in RESTART_NOT:
            return rc
        if k == max_restarts:
            if max_restarts:
                log(f"[hvdllm] attempt {k + 1} ended with {exit_reason(rc)}; no restart left "
                    f"(--max-restarts {max_restarts})")
            return rc
        log(f"[hvdllm] attempt {k + 1} ended with {exit_reason(rc)}: restarting from the latest checkpoint "
            f"(train.resume=true), restart {k + 1} of {max_restarts}")
    return rc


def check_available(cmd: list[str]) -> None:
    exe = cmd[0]
    if shutil.which(exe) is None:
        hint = {"mpirun": "install an MPI (make env does) or `module load openmpi`",
                "horovodrun": "activate the environment that has Horovod (.venv/bin)",
                "srun": "run on a Slurm cluster, or use --launcher mpirun",
                "sbatch": "run on a Slurm cluster (scripts/slurm_local.sh starts one here), or use "
                          "--launcher mpirun"}[exe]
        raise LaunchError(f"{exe} not found on PATH: {hint}")
