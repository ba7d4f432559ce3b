"""`hvdllm launch --max-restarts`: one rank killed with SIGKILL mid-run (no message, no cleanup:
as a lost process) ends the job; the launcher runs it again from the latest checkpoint, and the
finished run's losses, gradient norms and validation losses are the uninterrupted run's."""
import sys
import time
from pathlib import Path

import pytest
from launch_util import TINY, records, run, same_run


@pytest.mark.integration
def test_a_killed_rank_is_restarted_from_the_checkpoint(tmp_path, reference):
    out = Path(tmp_path) / "restarted"
    sets = [*TINY, "backend=torch", "train.batch_size=4", f"train.out_dir={out}", "train.fail_at_step=4",
            "train.fail_rank=1", "train.fail_mode=kill", "train.sample_tokens=0"]
    argv = [sys.executable, "-m", "hvdllm", "launch", "-np", "2", "--max-restarts", "1", "--", "train",
            *[a for kv in sets for a in ("--set", kv)]]
    t0 = time.monotonic()
    r = run(argv, timeout=240)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:]
    assert "killed by SIGKILL" in r.stdout and "restarting from the latest checkpoint" in r.stdout, r.stdout[-3000:]
    assert "(attempt 2 of 2)" in r.stdout and "resumed from" in r.stdout and "step 3" in r.stdout
    assert [x["step"] for x in records(out) if "loss" in x] == [1, 2, 3, 4, 5, 6]
    # np=2 x 4 sequences = np=1 x 8 (test_integration.py holds dp to np=1 at 1e-5)
    same_run(out, reference("backend=torch", "train.batch_size=8"), rtol=1e-5, what="restarted")
    assert elapsed < 120, f"{elapsed:.0f} s"
