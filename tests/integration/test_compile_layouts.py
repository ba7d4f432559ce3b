"""train.compile under the layouts it composes with, step by step against the np=1 run (losses,
gradient norms, validation losses):
- TensorFlow data parallelism: XLA-compiled loss and gradients with Horovod's allreduce outside
  the compiled function, np=2 (micro-batch b, batches made on the background thread:
  train.prefetch=2) against np=1 (batch 2b, each batch made in the loop: train.prefetch=0);
- torch pipeline parallelism: pp=2 (1F1B, 4 micro-batches), each stage compiling only its own
  blocks, against test_pipeline.py's eager np=1 reference (shared by the session).
The torch compiled-equals-eager check in one process is tests/unit/test_compile.py."""
import pytest
from launch_util import same_run, train

TF_SETS = ["backend=tensorflow", "train.compile=true", "optim.grad_clip=0"]
DEEP = ["model.n_layer=4"]   # test_pipeline.py's model, so its reference is shared


@pytest.mark.integration
def test_tf_compiled_np2_equals_np1(tmp_path):
    r, ref = train(tmp_path, "np1", 1, TF_SETS + ["train.batch_size=8", "train.prefetch=0"])
    assert r.returncode == 0, r.stdout[-4000:]
    r, dp2 = train(tmp_path, "np2", 2, TF_SETS + ["train.batch_size=4", "train.prefetch=2"])
    assert r.returncode == 0, r.stdout[-4000:]
    # float32 sums in another order, as test_integration.py's np=2 check
    same_run(dp2, ref, rtol=1e-5, what="compiled np2")


@pytest.mark.integration
def test_torch_compiled_pipeline_equals_eager_single_process(tmp_path, reference):
    ref = reference(*DEEP, "backend=torch", "train.batch_size=8")
    r, d = train(tmp_path, "pp2", 2, DEEP + ["backend=torch", "parallel.pp=2", "parallel.microbatches=4",
                                             "train.batch_size=8", "train.compile=true"])
    assert r.returncode == 0, r.stdout[-4000:]
    # inductor's fused float32 reductions: measured ~1e-7 relative on the gradient norms
    same_run(d, ref, rtol=2e-5, what="torch compiled pp2")
