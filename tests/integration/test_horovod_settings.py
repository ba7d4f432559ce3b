"""aggregation.fusion_threshold_mb and aggregation.cycle_time_ms reach Horovod (they are
environment variables Horovod reads once, at init): seen in Horovod's own timeline (fused tensors
are copied into its fusion buffer) and in how long blocking allreduces wait for the next cycle."""
import json
import re
import sys

import pytest
from launch_util import mpirun_argv, run

PROBE = "tests/parallel/probe_horovod_settings.py"


def probe(tmp_path, backend, *sets):
    timeline = tmp_path / f"timeline-{backend}-{len(list(tmp_path.iterdir()))}.json"
    argv = mpirun_argv(2) + ["-x", "HVDLLM_BACKEND", "-x", "HOROVOD_TIMELINE", sys.executable, PROBE, *sets]
    r = run(argv, timeout=120, HVDLLM_BACKEND=backend, HOROVOD_TIMELINE=str(timeline))
    assert r.returncode == 0, r.stdout[-3000:]
    # (a rank's TensorFlow warning can land in the same line of the merged output: "0.211WARNING...")
    elapsed = float(re.search(r"elapsed (\d+\.\d{3})", r.stdout)[1])
    text = timeline.read_text()
    # Horovod leaves the JSON array open while it runs; closed here if it is still open
    text = text if text.rstrip().endswith("]") else text.rstrip().rstrip(",") + "]"
    events = {e.get("name") for e in json.loads(text) if isinstance(e, dict)}
    return events, elapsed


@pytest.mark.parallel
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fusion_threshold_and_cycle_time_reach_horovod(tmp_path, backend):
    events, fast = probe(tmp_path, backend, "aggregation.fusion_threshold_mb=64", "aggregation.cycle_time_ms=1")
    assert "MEMCPY_IN_FUSION_BUFFER" in events          # 8 x 4 kB tensors fused into one message
    events, slow = probe(tmp_path, backend, "aggregation.fusion_threshold_mb=0.001", "aggregation.cycle_time_ms=200")
    assert "MEMCPY_IN_FUSION_BUFFER" not in events      # a 1 kB buffer holds none of them: no fusion
    assert "ALLREDUCE" in events
    # each blocking allreduce waits for Horovod's next 200 ms cycle: 6 of them cannot take under
    # 4 cycles (only a lower bound: a busy machine makes it longer, never shorter)
    assert slow >= 0.8, f"6 allreduces took {slow:.3f} s with aggregation.cycle_time_ms=200 ({fast:.3f} s at 1 ms)"
