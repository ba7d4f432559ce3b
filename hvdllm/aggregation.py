"""Gradient aggregation rules, written once; backends only cast and call.

- op: 'average' | 'sum' | 'adasum' (Horovod's ops). 'average' with predivide f becomes a sum with
  prescale 1/f and postscale f/size (Horovod's gradient_predivide_factor: it keeps fp16 sums of
  many ranks inside range).
- compression: the wire dtype; the adapter casts before and restores after.
- accumulation: k micro-batches per optimizer step, each contributing loss/k, one reduction.
- fusion threshold and cycle time: Horovod reads them from the environment at init.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReduceArgs:
    op: str
    compression: str
    prescale: float = 1.0
    postscale: float = 1.0

    def kwargs(self) -> dict:
        return {"op": self.op, "compression": self.compression, "prescale": self.prescale,
                "postscale": self.postscale}


def reduce_args(agg_cfg, group_size: int) -> ReduceArgs:
    f = agg_cfg.predivide
    if agg_cfg.op == "average" and f != 1.0:
        return ReduceArgs("sum", agg_cfg.compression, 1.0 / f, f / group_size)
    return ReduceArgs(agg_cfg.op, agg_cfg.compression)


def split_microbatches(x: np.ndarray, y: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k equal micro-batches along the batch axis (the sampler hands out k*batch_size rows)."""
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into aggregation.accumulation={k}")
    return list(zip(np.split(x, k), np.split(y, k)))


def apply_horovod_env(agg_cfg) -> None:
    """Must run before hvd.init(): Horovod reads these once."""
    if agg_cfg.fusion_threshold_mb > 0:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(agg_cfg.fusion_threshold_mb * 1024 * 1024))
    if agg_cfg.cycle_time_ms > 0:
        os.environ["HOROVOD_CYCLE_TIME"] = str(agg_cfg.cycle_time_ms)


# Horovod's reduction op per aggregation.op name, and the wire dtype per compression name: the
# names are the core's, each backend passes its own horovod module and dtypes.
HOROVOD_OPS = {"average": "Average", "sum": "Sum", "adasum": "Adasum", "max": "Max", "min": "Min"}
COMPRESSIONS = ("none", "fp16", "bf16")


def horovod_op(hvd, name: str):
    """`hvd.Average` etc. for an op name of the config (horovod.torch or horovod.tensorflow)."""
    if name not in HOROVOD_OPS:
        raise ValueError(f"aggregation.op: {name!r} is not one of {', '.join(HOROVOD_OPS)}")
    return getattr(hvd, HOROVOD_OPS[name])


BF16_FALLBACK_MAX_DP = 4


def bf16_wire_problem(compression: str, dp: int, device: str) -> str | None:
    """Off a GPU, Horovod's ops take no bfloat16, so the bf16 wire is an allgather of 16-bit
    patterns summed locally: n/4 times an fp32 allreduce's bytes at dp=n, no saving above dp=4.
    On a GPU (NCCL) it is a real bfloat16 allreduce."""
    if compression != "bf16" or device.startswith("cuda") or dp <= BF16_FALLBACK_MAX_DP:
        return None
    return (f"aggregation.compression: 'bf16' off a GPU travels as an allgather (Horovod's CPU ops take "
            f"no bfloat16), which at dp={dp} sends {dp / 4:g}x the bytes of an fp32 allreduce; use "
            f"aggregation.compression = 'fp16' or 'none', or dp <= {BF16_FALLBACK_MAX_DP}")


def wire_dtype(compression: str, fp16, bf16):
    """The framework dtype a tensor travels in (None: as it is)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"aggregation.compression: {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    return {"none": None, "fp16": fp16, "bf16": bf16}[compression]
