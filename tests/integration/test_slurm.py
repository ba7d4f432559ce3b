"""Slurm, for real: a one-node Slurm (conftest.py's `slurm` fixture runs scripts/slurm_local.sh:
Debian slurm-wlm + munge, its own config under /tmp/hvdllm-slurm) starts hvdllm's ranks with
`srun --mpi=pmix` and through the job script of `hvdllm launch --launcher sbatch`. Each run
reproduces the single-process losses, and a failing rank ends the Slurm step with the message on every rank."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from launch_util import TINY, run, same_run, train


@pytest.fixture
def single(reference):
    """single(backend): the np=1 reference (mpirun), batch 8, shared by the session (conftest.py)."""
    return lambda backend: reference(f"backend={backend}", "train.batch_size=8")


def two_ranks(out) -> bool:
    """The run's own record of its layout (the last checkpoint's manifest)."""
    manifest = json.loads((out / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    return manifest["layout"].startswith("world=2 dp=2 pp=1 tp=1")


def hvdllm_args(out, sets):
    return [a for kv in [*TINY, f"train.out_dir={out}", *sets] for a in ("--set", kv)]


@pytest.mark.integration
def test_srun_equals_single_process(tmp_path, slurm, single):
    out = tmp_path / "srun"
    argv = ["srun", "-n", "2", "--mpi=pmix", "--time=5", sys.executable, "-m", "hvdllm", "train",
            *hvdllm_args(out, ["train.batch_size=4"])]
    r = run(argv, 300, **slurm)
    assert r.returncode == 0, r.stdout[-4000:]
    assert two_ranks(out)
    same_run(out, single("torch"), rtol=2e-4, what="srun")


@pytest.mark.integration
def test_sbatch_job_script_trains_tensorflow(tmp_path, slurm, single):
    """`hvdllm launch --launcher sbatch --wait`: the job script is written and printed, sbatch
    waits for the job (its --time is the deadline) and exits with the job's code."""
    out, script = tmp_path / "sbatch", tmp_path / "job.sbatch"
    argv = [sys.executable, "-m", "hvdllm", "launch", "-np", "2", "--launcher", "sbatch", "--wait",
            "--time", "00:05:00", "--script", str(script), "--",
            "train", *hvdllm_args(out, ["backend=tensorflow", "train.batch_size=4"])]
    r = run(argv, 400, cwd=tmp_path, **slurm)
    assert r.returncode == 0, r.stdout[-4000:]
    text = script.read_text()
    assert "#SBATCH --ntasks=2" in text and "srun -n 2 --mpi=pmix" in text and "#SBATCH --time=00:05:00" in text
    assert "#SBATCH --signal=USR1@120" in text   # the trainers' cue to stop with a checkpoint
    assert "Submitted batch job" in r.stdout
    assert two_ranks(out)
    same_run(out, single("tensorflow"), rtol=2e-4, what="sbatch")
    job_out = list(tmp_path.glob("hvdllm-*.out"))   # --output=%x-%j.out, in the submit directory
    assert len(job_out) == 1 and "[hvdllm] done: 6 steps" in job_out[0].read_text()


@pytest.mark.integration
def test_failing_rank_ends_the_srun_step(tmp_path, slurm):
    t0 = time.monotonic()
    argv = ["srun", "-n", "2", "--mpi=pmix", "--time=5", sys.executable, "-m", "hvdllm", "train",
            *hvdllm_args(tmp_path / "fail", ["train.batch_size=4", "train.fail_at_step=2", "train.fail_rank=1"])]
    r = run(argv, 200, **slurm)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "[hvdllm] rank 1 failed" in r.stdout and "train.fail_at_step" in r.stdout, r.stdout[-3000:]
    assert elapsed < 150, f"took {elapsed:.0f}s to end the job"


def _squeue_state(job: str, slurm) -> str:
    p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, **slurm})
    return p.stdout.strip()


def _until(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"no {what} within {timeout}s"
        time.sleep(0.5)


@pytest.mark.integration
def test_sbatch_requeue_chain_resumes_after_the_signal(tmp_path, slurm):
    """`--requeue`: the trainers stop with a checkpoint on SIGUSR1 (here from scancel, as Slurm
    sends it before --time runs out), the job script requeues the job, and the requeued job
    resumes from that checkpoint and finishes, on the trajectory of a run never interrupted."""
    out, script = tmp_path / "chain", tmp_path / "job.sbatch"
    # optim.min_lr = optim.lr: a constant lr after the warm-up, so the trajectory does not depend
    # on train.steps and the first stopped + 5 steps can be checked against a short run
    sets = ["train.batch_size=4", "train.steps=600", "train.eval_every=0", "train.checkpoint_every=0",
            "train.stop_check_s=0.3", "train.sample_tokens=0", "optim.min_lr=3e-3"]
    argv = [sys.executable, "-m", "hvdllm", "launch", "-np", "2", "--launcher", "sbatch", "--requeue",
            "--time", "00:10:00", "--script", str(script), "--", "train", *hvdllm_args(out, sets)]
    r = run(argv, 60, cwd=tmp_path, **slurm)
    assert r.returncode == 0, r.stdout[-3000:]
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    log = out / "metrics.jsonl"
    _until(lambda: log.exists() and len(log.read_text().splitlines()) >= 50, 120, "50 steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30, env={**os.environ, **slurm})
    # a requeued job may start again after AuthInfo=cred_expire seconds (10 in slurm_local.sh)
    _until(lambda: "resumed from" in (tmp_path / f"hvdllm-{job}.out").read_text(), 180, "resumed job")
    _until(lambda: _squeue_state(job, slurm) == "", 300, "end of the requeued job")
    text = (tmp_path / f"hvdllm-{job}.out").read_text()
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+) of 600", text).group(1))
    assert "requeued, it resumes from there" in text
    assert f"(step {stopped})" in text and "[hvdllm] done: 600 steps" in text, text[-3000:]
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **slurm}).stdout
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, info
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 601)), (steps[:3], steps[-3:], len(steps))
    r, whole = train(tmp_path, "uninterrupted", 2, sets + [f"train.steps={stopped + 5}"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    same_run(out, whole, rtol=1e-5, keys=("loss", "grad_norm"), steps=range(1, stopped + 6),
             what=f"stopped at {stopped}, requeued")
