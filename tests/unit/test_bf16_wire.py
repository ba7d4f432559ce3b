"""The bf16 wire off a GPU is an allgather (Horovod's CPU ops take no bfloat16): refused where it
would send more than an fp32 allreduce, allowed on a GPU (NCCL reduces bfloat16 itself)."""
import pytest

from hvdllm.aggregation import bf16_wire_problem


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_allgather_fallback_up_to_dp4(dp):
    assert bf16_wire_problem("bf16", dp, "cpu") is None


@pytest.mark.parametrize("dp", [5, 8, 64])
def test_allgather_fallback_refused_above_dp4_with_the_fix(dp):
    msg = bf16_wire_problem("bf16", dp, "cpu")
    assert msg.startswith("aggregation.compression") and f"dp={dp}" in msg
    assert f"{dp / 4:g}x the bytes" in msg and "'fp16'" in msg


@pytest.mark.parametrize("compression,device", [("bf16", "cuda:0"), ("bf16", "cuda:3"), ("fp16", "cpu"),
                                                ("none", "cpu")])
def test_gpu_and_other_wires_are_not_limited(compression, device):
    assert bf16_wire_problem(compression, 64, device) is None
