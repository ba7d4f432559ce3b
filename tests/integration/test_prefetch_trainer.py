"""train.prefetch changes no number: the trainer's loop with each batch made in the loop
(train.prefetch=0) gives exactly (rtol 0) the losses, gradient norms and validation losses of
the np=1 reference, which makes its batches on the background thread (the default, 2). The
prefetcher itself (order, errors, deadline, shutdown): tests/unit/test_prefetch.py."""
import pytest
from launch_util import same_run, train


@pytest.mark.integration
def test_prefetch_changes_no_number(tmp_path, reference):
    ref = reference("backend=torch", "train.batch_size=8")   # test_integration.py's np=1 run
    r, d = train(tmp_path, "no-prefetch", 1, ["backend=torch", "train.batch_size=8", "train.prefetch=0"])
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=0, what="train.prefetch=0")
