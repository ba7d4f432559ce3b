"""Smoke test of `hvdllm bench calibrate`: it runs end to end (mpirun -np 2, the tiny GPT, two
batch sizes, two message sizes, one repetition), writes a calibration JSON of the shape
hvdllm/calibration.json has, and `hvdllm plan` plans with it.

Not a timing test: no speed is asserted, only that every fitted figure is a positive number."""
import json
import sys

import horovod.torch  # noqa: F401  (installed by make env)
from launch_util import run

from hvdllm import plan


def test_bench_calibrate_smoke(tmp_path, capsys):
    out = tmp_path / "cal.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "calibrate", "--np", "2", "--model", "tiny",
            "--batches", "1,2", "--sizes", "64,65536", "--reps", "1", "--matmul", "64", "--out", str(out)]
    p = run(argv, timeout=90)   # ~12 s on a loaded 2-core machine (MPI, Horovod, torch start-up)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "hvdllm.bench.calibrate_worker" in p.stdout   # the command
    assert "GFLOP/s" in p.stdout and "busbw GB/s" in p.stdout and "point-to-point" in p.stdout
    cal = json.loads(out.read_text())
    dev = cal["devices"]["this-cpu"]
    link = cal["links"]["this-node"]
    for v in (dev["peak_flops"]["fp32"], dev["achieved_flops"]["fp32"], dev["memory_bytes"],
              dev["memory_bandwidth"], link["bandwidth"], link["p2p"]["bandwidth"],
              *(c["busbw"] for c in link["collectives"].values())):
        assert v > 0
    assert sorted(link["collectives"]) == ["allgather", "allreduce", "reducescatter"]
    assert all(c["latency_s"] >= 0 for c in link["collectives"].values()) and dev["overhead_per_layer_s"] >= 0
    assert [pt["batch"] for pt in cal["fits"]["compute"]["points"]] == [1, 2]
    system = plan.load_calibration(str(out))
    assert system.name == "this-machine" and system.devices_per_node == 2
    assert plan.main(["configs/demo.toml", "--nodes", "1", "--devices-per-node", "2", "--calibration", str(out),
                      "--top", "2"]) == 0
    assert "this-machine" in capsys.readouterr().out
