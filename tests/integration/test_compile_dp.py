"""train.compile under data parallelism: TensorFlow's XLA-compiled loss and gradients with
Horovod's allreduce outside the compiled function, np=2 (micro-batch b, batches made on the
background thread: train.prefetch=2) against np=1 (batch 2b, each batch made in the loop:
train.prefetch=0), step by step: losses, gradient norms, validation losses. TensorFlow, not
torch: XLA compiles in about a second where inductor takes tens on 2 cores (the torch
compiled-equals-eager check is tests/unit/test_compile.py, one process)."""
import pytest
from launch_util import same_run, train

SETS = ["backend=tensorflow", "train.compile=true", "optim.grad_clip=0"]


@pytest.mark.integration
def test_compiled_np2_equals_np1(tmp_path):
    r, ref = train(tmp_path, "np1", 1, SETS + ["train.batch_size=8", "train.prefetch=0"])
    assert r.returncode == 0, r.stdout[-4000:]
    r, dp2 = train(tmp_path, "np2", 2, SETS + ["train.batch_size=4", "train.prefetch=2"])
    assert r.returncode == 0, r.stdout[-4000:]
    # float32 sums in another order, as test_integration.py's np=2 check
    same_run(dp2, ref, rtol=1e-5, what="compiled np2")
