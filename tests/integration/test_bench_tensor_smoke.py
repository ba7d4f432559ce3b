"""Smoke test of `hvdllm bench tensor`: it runs end to end (mpirun -np 2, tiny blocks, one timed
step) and writes the JSON with the collectives counted against theory.

Not a timing test: timings on shared CI machines mean nothing, so no speed is asserted here.
Counts and bytes are not timings: they must match Megatron-LM's 2 + 2 allreduces per block exactly.
"""
import json
import re
import sys

import horovod.torch  # noqa: F401  (installed by make env)
import pytest
from launch_util import run

from hvdllm.bench import common


def test_bench_tensor_smoke(tmp_path):
    out = tmp_path / "tensor.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "tensor", "--np", "2", "--model", "tiny",
            "--width", "32,64", "--layers", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]
    p = run(argv, timeout=90)  # ~15 s on a loaded 2-core machine (MPI, Horovod, torch start-up)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "hvdllm.bench.tensor_worker" in p.stdout  # the command
    assert "allreduces/block fwd+bwd" in p.stdout and "speed-up" in p.stdout  # both tables
    for width in (32, 64):
        assert len(re.findall(rf"^torch +{width} ", p.stdout, re.M)) == 2  # a row in each table

    d = json.loads(out.read_text())
    for key in ("benchmark", "command", "commands", "np", "model_config", "definitions", "rows", "goals",
                "runs", "files"):
        assert key in d, key
    assert d["benchmark"] == "tensor" and d["np"] == 2 and "mpirun -np 2" in d["command"]
    assert [(r["backend"], r["width"]) for r in d["rows"]] == [("torch", 32), ("torch", 64)]
    for r in d["rows"]:
        B, T, C = 2, 16, r["width"]
        assert (r["ar_forward"], r["ar_backward"]) == (2, 2) and r["same_on_every_rank"]
        assert r["message_elements"] == [B * T * C] == [r["elements_theory"]]
        assert r["bytes_ratio"] == 1 and r["payload_mb"] == pytest.approx(4 * B * T * C * 4 / 1e6)
        assert r["ring_mb_per_rank"] == pytest.approx(r["payload_mb"])  # 2(n-1)/n = 1 at n=2
        assert r["check_rel_diff"] < 1e-4  # the split blocks compute what the unsplit ones do
        assert r["param_frac"] == pytest.approx(r["param_frac_theory"])
        for key in ("solo_ms", "tp_ms", "compute_ms", "speedup", "comm_share_calls", "busbw_gbs"):
            assert r[key] is not None and r[key] > 0, key
        assert r["steps"] == {"tp2": 1, "tp2-compute": 1, "solo": 1}
    met = {g["goal"].split(" ")[0]: g["met"] for g in d["goals"]}
    assert met["allreduces"] == met["payload"] == met["tp"] == "yes"
    assert (tmp_path / "tensor.png").stat().st_size > 0
    above = any(r["speedup"] > 2 or r["compute_speedup"] > 2 or r["efficiency"] > 1 for r in d["rows"])
    assert (common.ABOVE_NOTE in p.stdout) == above  # a speed-up above the rank count is flagged
