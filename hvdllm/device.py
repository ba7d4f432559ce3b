"""Which device a rank computes on (train.device), framework-free.

The decision is pure so every branch is testable without a GPU: the backend counts the GPUs its
framework sees (`backend.device_info()`), `choose` answers, the backend applies the answer
(`backend.use_device`) before any tensor is made. One GPU per local rank: two ranks sharing a
GPU would each hold the whole model and fight over its memory, so that is an error, not a
silent fallback.
"""
from __future__ import annotations

import socket
import sys

from .errors import ConfigError


def choose(requested: str, local_rank: int, local_size: int, gpus: int, host: str,
           gpu_ops: bool = True) -> str:
    """'cpu' or 'cuda:<local_rank>'; a ConfigError naming the fix otherwise.

    `gpus`: GPUs the framework sees on this host; `gpu_ops`: Horovod was built with GPU
    operations (NCCL), without which it cannot reduce device tensors."""
    if requested == "cpu":
        return "cpu"
    if gpus == 0:
        if requested == "cuda":
            raise ConfigError([f"train.device: 'cuda' asked, but the framework sees no GPU on host {host} "
                              f"(no CUDA build, or CUDA_VISIBLE_DEVICES hides them); run where a GPU is "
                              f"visible, or set train.device = 'auto' or 'cpu'"])
        return "cpu"
    if local_size > gpus:
        raise ConfigError([f"train.device: {local_size} ranks on host {host} but {gpus} GPU"
                          f"{'s' if gpus > 1 else ''}: launch at most {gpus} per node (-np / "
                          f"--ntasks-per-node) or set train.device = 'cpu'"])
    if not gpu_ops:
        # a host copy per collective would hide a slow path behind a GPU run; say so instead
        raise ConfigError([f"train.device: host {host} has {gpus} GPU{'s' if gpus > 1 else ''} but this "
                          f"Horovod was built without GPU operations, so it cannot reduce device tensors; "
                          f"rebuild it with HOROVOD_GPU_OPERATIONS=NCCL (scripts/bootstrap.sh does "
                          f"where nvidia-smi lists a GPU) or set train.device = 'cpu'"])
    return f"cuda:{local_rank}"


def select(requested: str, rt, backend) -> str:
    """Decide this rank's device from what `backend` sees, apply it, and log host, rank, device."""
    gpus, gpu_ops = backend.device_info() if requested != "cpu" else (0, False)
    host = socket.gethostname()
    dev = choose(requested, rt.local_rank, rt.local_size, gpus, host, gpu_ops)
    backend.use_device(dev)
    print(f"[hvdllm] host {host} rank {rt.rank} (local {rt.local_rank}/{rt.local_size}): device {dev}",
          file=sys.stderr, flush=True)
    return dev


def log_transport(layout, words: str) -> None:
    """A pipeline stage says how its activations travel (once per stage: its dp rank 0)."""
    if layout.dp_rank == 0:
        print(f"[hvdllm] rank {layout.rank} (pipeline stage {layout.pp_rank}): activations over MPI as {words}",
              file=sys.stderr, flush=True)


def p2p_transport(on_gpu: bool, cuda_aware: bool) -> str:
    """How a pipeline's activations travel over mpi4py, in words for the start-up log."""
    if not on_gpu:
        return "host arrays (CPU)"
    if cuda_aware:
        return "device buffers (this MPI is CUDA-aware)"
    return "pinned host buffers (this MPI is not CUDA-aware)"
