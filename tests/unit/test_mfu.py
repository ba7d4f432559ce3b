"""hvdllm/mfu.py's arithmetic, and each backend's measured matmul peak."""
import pytest

from hvdllm import mfu, params
from hvdllm.config import ModelConfig


def test_utilisation_is_model_flops_over_the_ranks_peak():
    m = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=256)
    per_step = mfu.flops_per_step(m, 1000)
    assert per_step == params.flops_per_token(m) * 1000
    # 1e9 FLOP in 1 s on 2 ranks of 1e9 FLOP/s each: half the peak
    assert mfu.utilisation(1e9, 1.0, 1e9, 2) == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["torch_backend", "tf_backend"])
def test_matmul_peak_is_measured_in_the_runs_precision(backend):
    import importlib
    be = importlib.import_module(backend)
    for precision in ("fp32", "bf16"):
        flops = be.matmul_flops(precision, n=128)
        assert 1e7 < flops < 1e14, (precision, flops)   # a CPU core to a GPU: a measured figure
