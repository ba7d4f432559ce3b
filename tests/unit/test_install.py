"""The install instructions run as written: the README's cluster block through bash (its exports
reach `make env`), and scripts/bootstrap.sh's stamp, which holds what the environment was built
for, so that changing HOROVOD_GPU_OPERATIONS (or a framework version) installs again."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cluster_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Installing on a cluster"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_cluster_lines_reach_make_env():
    # `module` and `make` stand in for the cluster's: what matters is what reaches them
    script = ('module() { echo "module $*"; }\n'
              'make() { echo "make $* gpu-ops=$HOROVOD_GPU_OPERATIONS system=$HVDLLM_SYSTEM_PACKAGES"; }\n'
              + cluster_block())
    env = {k: v for k, v in os.environ.items() if k not in ("HOROVOD_GPU_OPERATIONS", "HVDLLM_SYSTEM_PACKAGES")}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0 and not p.stderr, (p.stdout, p.stderr)
    assert p.stdout.splitlines() == ["module load openmpi cuda", "make env gpu-ops=NCCL system=1"], p.stdout


def check(venv: Path, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HOROVOD_GPU_OPERATIONS", "HVDLLM_SYSTEM_PACKAGES")}
    e.update(HVDLLM_VENV=str(venv), **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--check"], capture_output=True,
                          text=True, env=e, timeout=30, cwd=ROOT)


def test_the_stamp_holds_the_gpu_setting(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    first = check(venv)
    assert first.returncode == 1 and "would install" in first.stdout   # nothing built there yet
    settings = re.search(r"would install: (.*) \(stamp", first.stdout).group(1)
    assert "gpu-ops=cpu" in settings or "gpu-ops=NCCL" in settings   # NCCL where nvidia-smi lists a GPU
    (venv / ".hvdllm-installed").write_text(settings + "\n")
    assert check(venv).returncode == 0
    other = check(venv, HOROVOD_GPU_OPERATIONS="MPI" if "gpu-ops=NCCL" in settings else "NCCL")
    assert other.returncode == 1 and "gpu-ops=" in other.stdout, other.stdout
    assert check(venv, HVDLLM_TORCH_SPEC="torch==0.0.1").returncode == 1
