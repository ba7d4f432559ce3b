"""The launcher commands and the sbatch job script hvdllm writes (the Slurm runs themselves are
in test_slurm.py)."""
import pytest

from hvdllm import launch
from hvdllm.errors import LaunchError


def test_mpirun_and_srun_commands():
    cmd = launch.command("mpirun", 4, ["train", "cfg.toml"])
    assert cmd[:3] == ["mpirun", "-np", "4"] and "OMPI_MCA_mpi_yield_when_idle=1" in cmd
    assert cmd[-4:-2] == ["-m", "hvdllm"] and cmd[-2:] == ["train", "cfg.toml"]
    srun = launch.command("srun", 2, ["train"])
    assert srun[:3] == ["srun", "-n", "2"] and "--mpi=pmix" in srun
    assert "--kill-on-bad-exit=1" in srun  # a rank failing at start-up ends the step


def test_worker_commands_for_the_benchmarks():
    cmd = launch.command("mpirun", 2, ["--steps", "3"], module="hvdllm.bench.dp_worker",
                         env=["PYTHONPATH", "HOROVOD_CYCLE_TIME=1"])
    assert cmd[-4:] == ["-m", "hvdllm.bench.dp_worker", "--steps", "3"]
    assert cmd[-9:-5] == ["-x", "PYTHONPATH", "-x", "HOROVOD_CYCLE_TIME=1"]  # before the program
    srun = launch.command("srun", 2, ["x"], module="m", env=["PYTHONPATH", "A=1", "B=2"])
    assert "--export=ALL,A=1,B=2" in srun and srun[-3:] == ["-m", "m", "x"]
    with pytest.raises(LaunchError):
        launch.command("horovodrun", 2, ["x"], env=["A=1"])


def test_job_script_signal_and_requeue():
    plain = launch.job_script(8, ["train", "a b.toml"], nodes=2, time_limit="01:00:00", partition="gpu")
    for line in ("#SBATCH --ntasks=8", "#SBATCH --nodes=2", "#SBATCH --time=01:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR1@120"):
        assert line in plain.splitlines()
    assert "exec srun -n 8 --mpi=pmix" in plain and "'a b.toml'" in plain   # quoted for the shell
    assert "requeue" not in plain and "train.resume" not in plain
    assert "--signal" not in launch.job_script(2, ["train"])            # no --time: no warning signal
    assert "--signal" not in launch.job_script(2, ["train"], time_limit="10", signal_before=0)
    chain = launch.job_script(2, ["train", "c.toml"], time_limit="10", requeue=True)
    lines = chain.splitlines()
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    assert lines[[i for i, s in enumerate(lines) if s.startswith("srun ")][0]].endswith("--set train.resume=true")
    assert 'if [ "$rc" -eq 75 ]; then' in lines and 'exit "$rc"' in lines


def test_restarts_rerun_a_job_whose_rank_died_resuming_it():
    """run_with_restarts on a real command that dies as mpirun reports a killed rank (137) on its
    first attempt: it runs again with train.resume=true and HVDLLM_ATTEMPT=1, says why, and stops
    at once on codes a restart cannot help."""
    import subprocess
    import sys
    prog = ("import os, sys; a = int(os.environ['HVDLLM_ATTEMPT']); "
            "sys.exit(137 if a == 0 else 0 if 'train.resume=true' in sys.argv else 1)")
    seen, said = [], []

    def make(argv):
        seen.append(argv)
        return [sys.executable, "-c", prog, *argv]

    def run(cmd, env):
        return subprocess.call(cmd, env=env)
    assert launch.run_with_restarts(make, ["train", "c.toml"], 2, run=run, log=said.append) == 0
    assert seen == [["train", "c.toml"], ["train", "c.toml", "--set", "train.resume=true"]]
    assert any("killed by SIGKILL" in m and "restarting from the latest checkpoint" in m for m in said)
    for rc in (2, 75):   # a configuration error, a stop with a checkpoint: never rerun
        calls = []
        assert launch.run_with_restarts(lambda a: a, ["train"], 3, run=lambda c, e: calls.append(c) or rc,
                                        log=said.append) == rc
        assert len(calls) == 1
    calls = []
    assert launch.run_with_restarts(lambda a: a, ["train"], 1, run=lambda c, e: calls.append(c) or 1,
                                    log=said.append) == 1
    assert len(calls) == 2 and "no restart left" in said[-1]
    assert launch.exit_reason(137) == "exit 137: a rank was killed by SIGKILL"


def test_job_script_restart_loop(tmp_path):
    import subprocess
    text = launch.job_script(4, ["train", "c.toml"], max_restarts=2)
    lines = text.splitlines()
    assert "exec srun" not in text and 'exit "$rc"' in lines
    loop = [s for s in lines if s.strip().startswith("if [ \"$HVDLLM_ATTEMPT\" -eq 0 ]")]
    assert len(loop) == 1 and loop[0].count("srun -n 4") == 2
    first, again = loop[0].split("; else ")
    assert "train.resume=true" not in first and again.rstrip("; fi").endswith("--set train.resume=true")
    assert any(s.strip().startswith('case "$rc" in 0|2|75|130)') for s in lines)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0   # valid shell
    both = launch.job_script(2, ["train"], time_limit="10", requeue=True, max_restarts=1)
    assert "scontrol requeue" in both and both.count("train.resume=true") == 2
