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
