"""Smoke test of `hvdllm bench pipeline`: it runs end to end (mpirun -np 2, a tiny GPT, m = 1, 2,
one timed step) and writes the JSON, the Chrome traces and the plots.

Not a timing test: timings on shared CI machines mean nothing, so no speed is asserted here.
"""
import json
import re
import sys

import horovod.torch  # noqa: F401  (installed by make env)
import pytest
from launch_util import run

from hvdllm.bench import common


def test_bench_pipeline_smoke(tmp_path):
    out = tmp_path / "pipeline.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "pipeline", "--pp", "2", "--m", "1,2", "--steps", "1",
            "--warmup", "1", "--model", "tiny", "--out", str(out)]
    p = run(argv, timeout=90)  # ~16 s even on a loaded 2-core machine (MPI, Horovod, torch start-up)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "frac of ideal (step)" in p.stdout  # command and table
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 2):
            assert len(re.findall(rf"^{schedule} +{m} ", p.stdout, re.M)) == 1 + 2  # table, 2 ranks

    d = json.loads(out.read_text())
    for key in ("benchmark", "command", "p", "model_config", "stage_layers", "definitions", "rows",
                "variants", "goals", "files", "trace_m"):
        assert key in d, key
    assert d["benchmark"] == "pipeline" and d["p"] == 2 and d["trace_m"] == 2
    assert sorted((r["schedule"], r["m"]) for r in d["rows"]) == [("1f1b", 1), ("1f1b", 2), ("gpipe", 1), ("gpipe", 2)]
    for v in d["variants"]:
        assert v["steps"] == 1 and v["step_s"] > 0 and 0 < v["eff_step"] <= v["eff_pipe"] * 1.0001
        assert v["ideal"] == pytest.approx(1 - 1 / (v["m"] + 1))
        assert v["peak_inflight"] == v["sim_peak_inflight"] == v["probe_peak_inflight"]
        assert min(v["peak_act_bytes"]) > 0 and all(h >= a for h, a in zip(v["peak_held_bytes"], v["peak_act_bytes"]))
    gp2 = next(v for v in d["variants"] if (v["schedule"], v["m"]) == ("gpipe", 2))
    assert gp2["peak_inflight"] == [2, 2]
    f1b2 = next(v for v in d["variants"] if (v["schedule"], v["m"]) == ("1f1b", 2))
    assert f1b2["peak_inflight"] == [2, 1]
    for schedule in ("gpipe", "1f1b"):
        trace = json.loads((tmp_path / f"pipeline_{schedule}_trace.json").read_text())
        events = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 0]
        assert {e["tid"] for e in events} == {0, 1}
        assert sum(e["args"]["op"] == "forward" for e in events if "args" in e) == 2 * 2  # 2 stages x m=2
        assert any(e["pid"] == 1 for e in trace["traceEvents"])  # the simulator beside it
        assert (tmp_path / f"pipeline_{schedule}_sim_trace.json").exists()
    assert (tmp_path / "pipeline.png").stat().st_size > 0
    assert (tmp_path / "pipeline_timeline.png").stat().st_size > 0
    above = any(v["eff_step"] > 1 or v["eff_pipe"] > 1 for v in d["variants"])
    assert (common.ABOVE_NOTE in p.stdout) == above  # an efficiency above 1 is flagged
