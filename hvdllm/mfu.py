"""Model FLOPs utilisation of a run: the model's training FLOPs per token
(hvdllm.params.flops_per_token: 6N plus the attention term, as PaLM's appendix B counts them) times
the tokens trained per second, over the peak of the ranks that train. A rank's peak is what its
backend's own matrix product reaches on its compute threads, measured at start (`matmul_flops`):
on a CPU no datasheet figure applies, and this one is the machine's own limit under the run's
thread count and contention (every trainer rank measures at once). An MFU above 1 is a
measurement bug, not a result."""
from __future__ import annotations

from . import params


def flops_per_step(model_cfg, tokens_per_step: int) -> float:
    return params.flops_per_token(model_cfg) * tokens_per_step


def utilisation(flops_per_step_: float, step_seconds: float, peak_per_rank: float, ranks: int) -> float:
    """Achieved model FLOP/s over the trainers' summed peak."""
    return flops_per_step_ / step_seconds / (peak_per_rank * ranks)
