"""The device seam: host transfers per step for dp, ZeRO-1, local SGD, pp=2 (also with ZeRO-1)
and tp=2, both backends
(tests/parallel/check_transfers.py under mpirun -np 2 says what is counted and the bound)."""
import sys

import pytest
from launch_util import hvdllm, mpirun_argv, run


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_host_transfers_per_step(backend):
    argv = mpirun_argv(2) + ["-x", "HVDLLM_BACKEND", sys.executable, "-m", "pytest", "-q", "-p",
                             "no:cacheprovider", "tests/parallel/check_transfers.py"]
    r = run(argv, timeout=300, HVDLLM_BACKEND=backend)
    assert r.returncode == 0, r.stdout[-5000:]


@pytest.mark.integration
def test_tensorflow_start_up_traces_no_function_per_parameter(tmp_path):
    """The initial-weights broadcast is one message: one per parameter traced a tf.function each
    and TensorFlow warned of retracing at every start (seen with 4 blocks, not with fewer)."""
    r = hvdllm(2, ["train", "--set", "backend=tensorflow", "--set", "train.steps=1", "--set", "model.n_layer=4",
                   "--set", "model.n_embd=32", "--set", "model.block_size=16", "--set", "train.batch_size=2",
                   "--set", f"train.out_dir={tmp_path}"], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "retracing" not in r.stdout, r.stdout[-4000:]
