"""Never lose work at the time limit: on train.stop_signal (SIGUSR1, what Slurm's
`--signal=USR1@120` and `scancel --signal=USR1` send) the trainers agree on a step, write a
checkpoint there and exit 75; `train.resume=true` continues from it. Real runs: mpirun with the
signal sent to one rank only (the other learns it from the agreement), and a Slurm step signalled
by scancel (tests/test_slurm.py's local Slurm)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_util import ROOT, TINY, env, mpirun_argv, same_run, train

from hvdllm import metrics

# optim.min_lr = optim.lr (TINY's): a constant lr after the warm-up, so the trajectory does not
# depend on train.steps and a run stopped at step s of 100000 can be compared step by step with
# an uninterrupted run of s + 3 steps.
LONG = ["train.steps=100000", "train.eval_every=0", "train.checkpoint_every=0", "train.stop_check_s=0.2",
        "train.batch_size=4", "optim.min_lr=3e-3"]


def args(out, sets):
    return [a for kv in [*TINY, f"train.out_dir={out}", *sets] for a in ("--set", kv)]


def start(argv, **extra) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_steps(p: subprocess.Popen, out: Path, n: int, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise AssertionError(f"the run ended early:\n{p.stdout.read()[-3000:]}")
        log = out / "metrics.jsonl"
        if log.exists() and sum(1 for r in metrics.read(log) if "loss" in r) >= n:
            return
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError(f"no {n} steps within {timeout}s")


def finish(p: subprocess.Popen, timeout: float = 120) -> str:
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"did not stop within {timeout}s of the signal:\n{p.communicate()[0][-3000:]}")


def rank_pid(out: Path, rank: int) -> int:
    """The rank's python process (mpirun sets OMPI_COMM_WORLD_RANK in its environment)."""
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            if str(out) in cmd and "mpirun" not in cmd and d.name.isdigit():
                environ = (d / "environ").read_bytes().split(b"\0")
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                    return int(d.name)
        except OSError:
            continue
    raise AssertionError(f"rank {rank} of {out} not found")


def check_stopped(text: str, rc: int, out: Path) -> int:
    assert rc == 75, text[-3000:]
    m = re.search(r"stopped by SIGUSR1 after step (\d+) of 100000", text)
    assert m, text[-3000:]
    step = int(m.group(1))
    manifest = out / "checkpoints" / f"step_{step:08d}" / "manifest.json"
    assert json.loads(manifest.read_text())["step"] == step
    return step


@pytest.mark.integration
def test_signal_to_one_rank_stops_all_at_one_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = start(mpirun_argv(2) + [sys.executable, "-m", "hvdllm", "train", *args(out, LONG)])
    wait_for_steps(p, out, 5)
    os.kill(rank_pid(out, 1), signal.SIGUSR1)
    step = check_stopped(finish(p), p.returncode, out)
    # continue from that step: the numbers of a run that was never interrupted
    r, _ = train(tmp_path, "run", 2, LONG[1:] + [f"train.steps={step + 3}", "train.resume=true"])
    assert r.returncode == 0 and f"(step {step})" in r.stdout, r.stdout[-3000:]
    logged = [x["step"] for x in metrics.read(out / "metrics.jsonl") if "loss" in x]
    assert logged[-3:] == [step + 1, step + 2, step + 3]
    r, whole = train(tmp_path, "uninterrupted", 2, LONG[1:] + [f"train.steps={step + 3}"])
    assert r.returncode == 0, r.stdout[-3000:]
    same_run(out, whole, rtol=1e-5, what=f"stopped at {step}, resumed")


@pytest.mark.integration
def test_slurm_scancel_signal_stops_a_tensorflow_job(tmp_path, slurm):
    out, name = tmp_path / "run", f"hvdllm-stop-{os.getpid()}"
    p = start(["srun", "-n", "2", "--mpi=pmix", "--time=5", f"--job-name={name}", sys.executable, "-m",
               "hvdllm", "train", *args(out, LONG + ["backend=tensorflow"])], **slurm)
    wait_for_steps(p, out, 5)
    subprocess.run(["scancel", "--signal=USR1", f"--name={name}"], check=True, timeout=30,
                   env={**os.environ, **slurm})
    check_stopped(finish(p), p.returncode, out)
