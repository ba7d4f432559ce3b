"""Horovod elastic mode (`hvdllm launch --elastic`, hvdllm/elastic.py): of 3 Gloo workers under
horovodrun's elastic driver, rank 2 kills itself with SIGKILL mid-run (no message, no cleanup:
a lost process); the other two restore the last in-memory commit, continue on 2 workers, finish
every step and write the final checkpoint, and the job exits 0. Both frameworks.

Up to the commit the run is the non-elastic one: np=3 x 4 sequences per rank computes what one
process with 12 does (test_integration.py holds dp to np=1), so its losses up to the commit
equal the shared np=1 reference's. After the resize the global batch is 2 x 4: no equality is
claimed there, only that every step is logged once and the run ends with its checkpoint."""
import re
import sys
import time
from pathlib import Path

import pytest
from launch_util import TINY, by_step, records, run, same_run

from hvdllm import checkpoint

STEPS, KILL_AT, COMMIT_EVERY = 6, 4, 3   # killed in step 5 (index 4): step 4 is lost, the commit is at 3


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_lost_worker_is_dropped_and_training_continues(tmp_path, reference, backend):
    out = Path(tmp_path) / "elastic"
    sets = [*TINY, f"backend={backend}", "train.batch_size=4", f"train.out_dir={out}",
            f"train.fail_at_step={KILL_AT}", "train.fail_rank=2", "train.fail_mode=kill",
            f"train.elastic_commit_every={COMMIT_EVERY}", "train.sample_tokens=0"]
    argv = [sys.executable, "-m", "hvdllm", "launch", "-np", "3", "--elastic", "--min-np", "2", "--max-np", "3",
            "--", "train", *[a for kv in sets for a in ("--set", kv)]]
    t0 = time.monotonic()
    # a survivor learns of the lost peer when its Gloo receive times out (default 30 s; 5 here)
    r = run(argv, timeout=240, HOROVOD_GLOO_TIMEOUT_SECONDS=5)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-5000:]
    # (a lost worker is seen as a failed collective, or as the driver's notice that hosts were removed)
    assert re.search(r"elastic: resized from 3 to 2 workers \((a worker was lost|hosts were removed)\); "
                     r"continuing from the commit at step 3", r.stdout), r.stdout[-4000:]
    # every step once: step 4, logged on 3 workers before the kill, is logged again on 2
    assert [x["step"] for x in records(out) if "loss" in x] == list(range(1, STEPS + 1))
    assert checkpoint.latest(out) == out / "checkpoints" / f"step_{STEPS:08d}", checkpoint.latest(out)
    # up to the last commit before the kill: the np=3 non-elastic run (= np=1 with 3 x 4 sequences)
    ref = reference(f"backend={backend}", "train.batch_size=12")
    same_run(out, ref, rtol=2e-4, keys=("loss", "grad_norm", "val_loss"), steps=range(1, COMMIT_EVERY + 1),
             what="up to the commit")
    loss = by_step(out, "loss")
    assert loss[STEPS] < loss[1], loss   # the two workers went on learning
    assert elapsed < 120, f"{elapsed:.0f} s"
