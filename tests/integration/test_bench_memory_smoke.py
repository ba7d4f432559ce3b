"""Smoke test of `hvdllm bench memory`: the table runs end to end (mpirun -np 2, a tiny GPT, one
timed step) with the bytes each ZeRO stage holds measured from the live arrays against the
formula, and its communication against theory; the headline's search runs, and a budget below
what a rank needs is a "does not fit" ended by the watchdog, not a machine out of memory.

Not a timing test: no speed is asserted. Bytes are not timings: they must match the formula.
"""
import json
import sys

import pytest
from launch_util import run


def test_bench_memory_smoke(tmp_path):
    out = tmp_path / "memory.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "memory", "--np", "2", "--layers", "2", "--width", "64",
            "--seq", "16", "--batch", "2", "--steps", "1", "--headline", "--headline-width", "64",
            "--budget-gib", "0.05", "--out", str(out)]
    p = run(argv, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "hvdllm.bench.memory_worker" in p.stdout
    assert "params MB" in p.stdout and "the largest GPT" in p.stdout, p.stdout[-4000:]
    d = json.loads(out.read_text())
    rows = {r["row"]: r for r in d["results"]["torch"]["rows"]}
    assert list(rows) == ["0", "1", "2", "3", "3o"]
    shard = rows["3"]["formula"]["params"]
    for name, r in rows.items():
        f = r["formula"]
        assert r["optimizer_bytes"] == f["optimizer"] and r["grads_bytes"] == f["grads"], name
        # stage 2 keeps its master shard beside the whole model; offload its host copy beside the shard
        extra = shard if name in ("2", "3o") else 0
        assert r["params_bytes"] == f["params"] + extra, name
        assert r["peak_grown_bytes"] > 0 and r["step_s"] > 0, name
    table = {r["row"]: r for r in d["tables"]["torch"]}
    for name in ("1", "2"):
        assert table[name]["x_dp"] == pytest.approx(1.0, abs=0.01), name
    for name in ("3", "3o"):
        assert 1.45 <= table[name]["x_dp"] <= 1.6, name
    head = d["headline"]["torch"]
    assert [r["row"] for r in head["rows"]] == ["0", "3", "3o"]
    assert all(r["layers"] == 0 for r in head["rows"])      # 50 MiB: no rank even starts
    assert all(not r["fits"] and r["rc"] != 0 for r in head["runs"]) and len(head["runs"]) == 3
