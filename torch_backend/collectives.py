"""Horovod collectives for torch tensors, with the same names and arguments as tf_backend's.

The aggregation rules (which op, which wire dtype) are the core's; this adapter only casts
and calls. `process_set=None` means Horovod's global set, passed explicitly, never implied.
"""
from __future__ import annotations

import horovod.torch as hvd
import numpy as np
import torch

_OPS = {"average": "Average", "sum": "Sum", "adasum": "Adasum"}
_WIRE = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _op(name: str):
    if name not in _OPS:
        raise ValueError(f"aggregation.op: {name!r} is not one of {', '.join(_OPS)}")
    return getattr(hvd, _OPS[name])


def _wire(compression: str):
    if compression not in _WIRE:
        raise ValueError(f"aggregation.compression: {compression!r} is not one of {', '.join(_WIRE)}")
    return _WIRE[compression]


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
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def allreduce(self, tensor, op="average", name=None, compression="none", prescale=1.0, postscale=1.0):
        wire = self._to_wire(tensor, compression)
        out = hvd.allreduce(wire, op=_op(op), name=name, prescale_factor=prescale,
                            postscale_factor=postscale, process_set=self.process_set)
        return out.to(tensor.dtype)

    def grouped_allreduce(self, tensors, op="average", name=None, compression="none", prescale=1.0,
                          postscale=1.0):
        wire = [self._to_wire(t, compression) for t in tensors]
        outs = hvd.grouped_allreduce(wire, op=_op(op), name=name, prescale_factor=prescale,
                                     postscale_factor=postscale, process_set=self.process_set)
        return [o.to(t.dtype) for o, t in zip(outs, tensors)]

    def broadcast(self, tensor, root=0, name=None):
        return hvd.broadcast(tensor, root_rank=root, name=name, process_set=self.process_set)

    def allgather(self, tensor, name=None):
        return hvd.allgather(tensor, name=name, process_set=self.process_set)


def init_horovod(comm=None):
    """Start Horovod on mpi4py's communicator (MPI launchers) or from the environment (Gloo)."""
    hvd.init(comm=comm) if comm is not None else hvd.init()
    return hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()


class NumpyCollectives:
    """The same collectives on numpy arrays, for the core's framework-free strategies
    (ZeRO-1, local SGD). torch.from_numpy shares memory, so the casts cost nothing."""

    def __init__(self, coll: Collectives):
        self.coll = coll

    @property
    def rank(self) -> int:
        return self.coll.rank

    @property
    def size(self) -> int:
        return self.coll.size

    def allreduce(self, a, op="average", name=None, compression="none"):
        return self.coll.allreduce(torch.from_numpy(a), op=op, name=name, compression=compression).numpy()

    def reducescatter(self, a, op="average", name=None, compression="none"):
        t = self.coll._to_wire(torch.from_numpy(a), compression)
        out = hvd.reducescatter(t, op=_op(op), name=name, process_set=self.coll.process_set)
        return out.to(torch.float32 if a.dtype == np.float32 else out.dtype).numpy()

    def allgather(self, a, name=None):
        return self.coll.allgather(torch.from_numpy(a), name=name).numpy()

    def broadcast(self, a, root=0, name=None):
        return self.coll.broadcast(torch.from_numpy(a), root=root, name=name).numpy()
