import os
import subprocess
import sys
from pathlib import Path

import pytest

# the checkout and the tests' helpers (launch_util, user_models) import from every tier's folder
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SLURM_DIR = "/tmp/hvdllm-slurm"


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """np=1 runs shared by the whole session (one launch each instead of one per test file):
    reference(*sets) is the run folder of launch_util.TINY trained in one process with these
    settings, trained on first use. Tests compare with it and never write into it (a resume
    copies the folder first)."""
    from launch_util import train
    runs = {}

    def get(*sets):
        keys = [s.split("=", 1)[0] for s in sets]
        assert len(set(keys)) == len(keys), f"a key set twice: {sets}"
        key = tuple(sorted(sets))
        if key not in runs:
            runs[key] = train(tmp_path_factory.mktemp("reference"), "np1", 1, list(key))
        r, out = runs[key]
        assert r.returncode == 0, f"the np=1 reference {list(key)} failed:\n{r.stdout[-4000:]}"
        return out
    return get


@pytest.fixture(scope="session")
def slurm():
    """A real one-node Slurm (scripts/slurm_local.sh): {'SLURM_CONF': ...} for the clients.
    Failing to start it fails the tests that need it, with the script's words. Stopped at the
    end of the session if it was started here."""
    env = {**os.environ, "HVDLLM_SLURM_DIR": SLURM_DIR}
    script = str(ROOT / "scripts" / "slurm_local.sh")
    p = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"scripts/slurm_local.sh failed:\n{p.stdout}\n{p.stderr}"
    yield {"SLURM_CONF": f"{SLURM_DIR}/slurm.conf"}
    if "up:" in p.stdout:
        subprocess.run(["bash", script, "stop"], timeout=60, env=env)
