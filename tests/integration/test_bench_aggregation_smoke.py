"""Smoke test of `hvdllm bench aggregation`: it runs end to end (mpirun -np 2, torch, two message
sizes, one timed call each, the tiny GPT for ZeRO-1, no training runs, no profile) and writes the
JSON and the plot.

Not a timing test: timings on shared CI machines mean nothing, so no speed is asserted here.
"""
import json
import re
import sys

import horovod.torch  # noqa: F401  (installed by make env)
import mpi4py  # noqa: F401  (installed by make env)
import pytest
from launch_util import run

from hvdllm.bench import common


def test_bench_aggregation_smoke(tmp_path):
    out = tmp_path / "aggregation.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "aggregation", "--backends", "torch",
            "--sizes", "1KB,64KB", "--reps", "1", "--compress-sizes", "64KB", "--zero-np", "2",
            "--zero-model", "tiny", "--zero-steps", "1", "--zero-warmup", "1", "--no-train",
            "--no-profile", "--out", str(out)]
    p = run(argv, timeout=55)  # ~20 s on a loaded 2-core machine (MPI, Horovod, torch start-up)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "hvdllm/mpi4py" in p.stdout  # the command and the table
    assert re.search(r"^torch +1KB ", p.stdout, re.M) and re.search(r"^torch +64KB ", p.stdout, re.M)
    assert "fp16 speed-up" in p.stdout and re.search(r"^torch +2 +tiny ", p.stdout, re.M)  # compression, ZeRO

    d = json.loads(out.read_text())
    for key in ("benchmark", "argv", "np", "definitions", "commands", "runs", "failed", "bandwidth",
                "compression", "zero", "communication", "training", "profile", "goals", "tables"):
        assert key in d, key
    assert d["benchmark"] == "aggregation" and d["np"] == 2 and d["failed"] == []
    assert [r["size"] for r in d["bandwidth"]] == ["1KB", "64KB"]
    for r in d["bandwidth"]:
        for key in ("hvdllm_busbw", "mpi4py_busbw", "ratio", "numpy_busbw", "p2p_bw", "hvdllm_of_bound"):
            assert key in r, key
        assert r["same_sum"] == "yes"
    assert {"none_ms", "fp16_ms", "bf16_ms", "fp16_speedup", "bf16_speedup"} <= set(d["compression"][0])
    z = d["zero"][0]
    assert {"dp_state_mb", "zero_state_mb", "state_ratio", "step_ratio"} <= set(z)
    assert z["np"] == 2 and z["state_ratio"] == pytest.approx(0.5, abs=0.01)  # a count, not a timing
    assert d["training"] == [] and d["profile"] == []
    assert {r["goal"].split(" (")[0] for r in d["goals"]} == {"ZeRO-1 / DP step time"}  # no size >= 16 MB
    assert (tmp_path / "aggregation.png").stat().st_size > 0
    above = any(r["fp16_speedup"] > 2 or r["bf16_speedup"] > 2 for r in d["compression"])
    assert (common.ABOVE_NOTE in p.stdout) == above  # a speed-up above the rank count is flagged
