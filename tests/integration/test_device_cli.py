"""train.device = 'cuda' where no GPU is visible (this machine): `hvdllm train` ends with the one
message naming the fix, exit 2, and nothing written (no run folder, no prepared corpus)."""
import sys

import pytest
from launch_util import run


@pytest.mark.integration
def test_cuda_without_a_gpu_is_one_message_and_nothing_written(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    sets = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=2",
            "data.max_bytes=60000", "train.steps=2", "train.threads=1", "train.sample_tokens=0",
            "train.progress=false", "train.device=cuda", f"train.out_dir={out}"]
    r = run([sys.executable, "-m", "hvdllm", "train", *[a for s in sets for a in ("--set", s)]], 240,
            HVDLLM_CACHE=str(cache), CUDA_VISIBLE_DEVICES="")   # no GPU, even on a machine with one
    assert r.returncode == 2, r.stdout[-3000:]
    assert "invalid configuration (1 problem(s))" in r.stdout, r.stdout[-3000:]
    assert "train.device: 'cuda' asked, but the framework sees no GPU on host" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stdout and not out.exists() and not cache.exists()


@pytest.mark.integration
def test_gpu_check_driver_dry_part():
    """scripts/gpu_check.py's cuda-vs-cpu part in its dry mode (the CPU twice): the driver builds
    hvdllm's engine from configs/gpt2_124m.toml and reports one RESULT line that agrees."""
    r = run([sys.executable, "scripts/gpu_check.py", "--part", "devices"], 240, GPU_CHECK_DRY="1")
    assert r.returncode == 0, r.stdout[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(line) == 1 and '"ok": true' in line[0], r.stdout[-3000:]
