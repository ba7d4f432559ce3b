"""Smoke test of `hvdllm bench dp`: it runs end to end and writes the expected JSON.

Not a timing test: timings on shared CI machines mean nothing, so no speed is asserted here.
"""
import json
import sys

import pytest

from launch_util import run

import horovod.torch  # noqa: F401  (installed by make env)


def test_bench_dp_smoke(tmp_path):
    out = tmp_path / "dp.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "dp", "--np", "2", "--steps", "2", "--warmup",
            "1", "--model", "tiny", "--backends", "torch", "--out", str(out)]
    # two launches (np=2, np=1); < 30 s on an idle 2-core machine, the deadline allows for load
    p = run(argv, timeout=150)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "mpirun -np 1" in p.stdout  # commands are printed
    assert "median step s" in p.stdout and "hvdllm/hand" in p.stdout  # the table and the goals

    d = json.loads(out.read_text())
    for key in ("benchmark", "model", "params", "commands", "runs", "rows", "ratios", "goals"):
        assert key in d, key
    assert d["benchmark"] == "dp" and d["model"] == "tiny" and d["failed"] == []
    assert sorted((r["backend"], r["np"]) for r in d["runs"]) == [("torch", 1), ("torch", 2)]
    for r in d["runs"]:
        # np=2 adds 'solo': rank 0 alone, interleaved in the same group (np=1 time for scaling)
        assert set(r["variants"]) == {"hvdllm", "hand", "ddp"} | ({"solo"} if r["np"] == 2 else set())
        for name, v in r["variants"].items():
            assert v["n"] == 2 and v["median_s"] > 0 and v["tokens_per_s"] > 0
            assert len(v["rank_medians_s"]) == (1 if name == "solo" else r["np"])
        # every variant did the same arithmetic: same weights after the same steps
        for key in ("weights_rel_diff_after_warmup", "weights_rel_diff_vs_first"):
            agree = r[key]
            assert set(agree) == {"hand", "ddp"} and max(agree.values()) < 1e-5, (key, agree)
    rat = d["ratios"]["torch"]
    assert {"hvdllm/hand", "hvdllm/ddp", "scaling_efficiency", "scaling_efficiency_in_group"} <= set(rat)
    assert set(rat["scaling_efficiency"]) == {"hvdllm", "hand", "ddp"}
    assert set(rat["scaling_efficiency_in_group"]) == {"hvdllm", "hand", "ddp"}
    assert {(g["goal"]) for g in d["goals"]} >= {"hvdllm/hand", "hvdllm/ddp"}
    assert (tmp_path / "dp.png").stat().st_size > 0
