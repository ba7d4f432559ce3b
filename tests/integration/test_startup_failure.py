"""A rank that fails before MPI and Horovod are up (here: its framework cannot be imported) ends
the whole job with one message naming it, instead of leaving its peers waiting in start-up."""
import sys

import pytest
from launch_util import mpirun_argv, run


@pytest.mark.integration
def test_a_rank_that_cannot_import_its_backend_ends_the_job(tmp_path):
    broken = tmp_path / "broken" / "torch_backend"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("simulated: this node has no working torch")\n')
    # rank 1 finds the broken package first on its path (run from tmp_path so the checkout's own
    # torch_backend is not the first on sys.path)
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then export PYTHONPATH={broken.parent}:$PYTHONPATH; fi; '
              f'exec {sys.executable} -m hvdllm train --set train.steps=50 --set model.n_layer=1 '
              f'--set train.out_dir={tmp_path / "run"}')
    r = run(mpirun_argv(2) + ["sh", "-c", script], timeout=120, cwd=tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "[hvdllm] rank 1 failed: backend='torch': torch_backend cannot be imported" in r.stdout, r.stdout[-3000:]
    assert "simulated: this node has no working torch" in r.stdout
    assert "Traceback" not in r.stdout, r.stdout[-3000:]   # an environment error is a message
    assert not (tmp_path / "run" / "checkpoints").exists()
