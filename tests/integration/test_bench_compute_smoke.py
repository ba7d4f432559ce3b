"""`hvdllm bench compute` end to end on a tiny model, both backends, two settings (timings on a
shared machine mean nothing, so none is asserted): one hvdllm and one plain row per setting, the
figures finite and in range (MFU in (0, 1], positive times and rates, the ratios the medians'),
the goals said for each backend."""
import json
import math
import sys

import pytest
from launch_util import run


@pytest.mark.integration
def test_bench_compute_smoke(tmp_path):
    out = tmp_path / "compute.json"
    p = run([sys.executable, "-m", "hvdllm", "bench", "compute", "--settings", "fp32,fp32+ckpt",
             "--layers", "1", "--width", "32", "--heads", "2", "--seq", "32", "--batch", "2",
             "--steps", "2", "--warmup", "1", "--out", str(out)], timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    d = json.loads(out.read_text())
    assert [(r["backend"], r["setting"], r["loop"]) for r in d["rows"]] == [
        (b, s, loop) for b in ("torch", "tensorflow") for s in ("fp32", "fp32+ckpt") for loop in ("hvdllm", "plain")]
    for r in d["rows"]:
        assert r["n"] == 2 and 0 < r["p25_s"] <= r["median_s"] <= r["p75_s"], r
        assert 0 < r["mfu"] <= 1 and r["tokens_per_s"] == pytest.approx(2 * 32 / r["median_s"]), r
        assert r["peak_mib"] > 0 and math.isfinite(r["act_mib"]), r
    for hv, plain in zip(d["rows"][::2], d["rows"][1::2]):
        assert hv["vs_plain"] == pytest.approx(hv["median_s"] / plain["median_s"]) and hv["paired"] > 0
        assert ("vs_keep_paired" in hv) == (hv["setting"] == "fp32+ckpt") and hv.get("vs_keep_paired", 1) > 0
    assert set(d["goals"]) == {"torch", "tensorflow"} and "full checkpointing" in d["goals"]["torch"][-1]
    assert "plain" in p.stdout and "act MiB" in p.stdout
