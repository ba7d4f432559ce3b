"""Horovod collectives for TensorFlow tensors, with the same names and arguments as torch_backend's.

The aggregation rules (which op, which wire dtype) are the core's; this adapter only casts and
calls. `process_set=None` means Horovod's global set, passed explicitly, never implied. Works
eagerly and inside tf.function (Horovod's TF ops are graph ops).
"""
from __future__ import annotations

import os

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdllm.errors import ConfigError

_OPS = {"average": "Average", "sum": "Sum", "adasum": "Adasum"}
_WIRE = {"none": None, "fp16": tf.float16, "bf16": tf.bfloat16}


def _op(name: str):
    if name not in _OPS:
        raise ValueError(f"aggregation.op: {name!r} is not one of {', '.join(_OPS)}")
    return getattr(hvd, _OPS[name])


def _wire(compression: str):
    if compression not in _WIRE:
        raise ValueError(f"aggregation.compression: {compression!r} is not one of {', '.join(_WIRE)}")
    if compression == "bf16":
        # Measured with Horovod 0.28.1 on TF's CPU path (eager, tf.function and grouped).
        raise ConfigError([BF16_UNSUPPORTED])
    return _WIRE[compression]


BF16_UNSUPPORTED = (
    "aggregation.compression: 'bf16' is not supported by the tensorflow backend: Horovod 0.28.1's "
    "TensorFlow ops (HorovodAllreduce, HorovodGroupedAllreduce) accept only uint8, int8, int32, "
    "int64, half, float and double, so a bfloat16 wire tensor is rejected. Use 'fp16' or 'none', "
    "or backend='torch' (whose Horovod ops accept bfloat16).")


class Collectives:
    """Collectives over one Horovod process set (a group of ranks from the Layout)."""

    def __init__(self, process_set=None):
        self.process_set = process_set if process_set is not None else hvd.global_process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def _to_wire(self, t, compression):
        dtype = _wire(compression)
        return tf.cast(t, dtype) if dtype is not None and t.dtype.is_floating else t

    def allreduce(self, tensor, op="average", name=None, compression="none", prescale=1.0, postscale=1.0):
        tensor = tf.convert_to_tensor(tensor)
        out = hvd.allreduce(self._to_wire(tensor, compression), op=_op(op), name=name,
                            prescale_factor=prescale, postscale_factor=postscale,
                            process_set=self.process_set)
        return tf.cast(out, tensor.dtype)

    def grouped_allreduce(self, tensors, op="average", name=None, compression="none", prescale=1.0,
                          postscale=1.0):
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        wire = [self._to_wire(t, compression) for t in tensors]
        outs = hvd.grouped_allreduce(wire, op=_op(op), name=name, prescale_factor=prescale,
                                     postscale_factor=postscale, process_set=self.process_set)
        return [tf.cast(o, t.dtype) for o, t in zip(outs, tensors)]

    def broadcast(self, tensor, root=0, name=None):
        """`root` is a rank within this set (0 = its first member); Horovod wants the global rank."""
        return hvd.broadcast(tf.convert_to_tensor(tensor), root_rank=self._global_rank(root),
                             name=name, process_set=self.process_set)

    def _global_rank(self, set_rank: int) -> int:
        ranks = self.process_set.ranks
        return set_rank if ranks is None else ranks[set_rank]

    def allgather(self, tensor, name=None):
        return hvd.allgather(tf.convert_to_tensor(tensor), name=name, process_set=self.process_set)


def check_compression(compression: str) -> None:
    """Fail at start-up, not at the first reduction, on a wire format this backend lacks."""
    _wire(compression)


def init_horovod(comm=None):
    """Start Horovod on mpi4py's communicator (MPI launchers) or from the environment (Gloo)."""
    hvd.init(comm=comm) if comm is not None else hvd.init()
    return hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()


def dp_process_set(layout):
    """The Horovod process set of this rank's data-parallel group.

    The whole world when dp covers it; otherwise every dp group is registered (a collective
    call: all ranks make it in the same order), which needs HOROVOD_DYNAMIC_PROCESS_SETS=1.
    Horovod's shutdown is collective too: a rank that exits tears the sets down under ranks still
    using them ('Process set ... has not been registered'), so every rank must reach a final
    global collective before exiting.
    """
    if layout.dp == layout.world_size:
        return hvd.global_process_set
    if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") != "1":
        raise ConfigError([f"parallel: {layout.describe()} needs a data-parallel process set "
                           f"smaller than the world; start the job with HOROVOD_DYNAMIC_PROCESS_SETS=1"])
    mine = None
    for group in layout.all_groups("dp"):
        ps = hvd.add_process_set(list(group))
        if layout.rank in group:
            mine = ps
    return mine
