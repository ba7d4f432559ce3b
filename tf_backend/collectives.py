"""Horovod collectives for TensorFlow tensors, with the same names and arguments as torch_backend's.

The aggregation rules (which op, which wire dtype) are the core's; this adapter only casts and
calls. `process_set=None` means Horovod's global set, passed explicitly, never implied. Every
method works eagerly and inside tf.function (Horovod's TF ops are graph ops).
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from hvdllm import aggregation
from hvdllm.engines import HostCollectives

# Measured with Horovod 0.28.1: its TF ops HorovodAllreduce / HorovodGroupedAllreduce accept only
# uint8, int8, int32, int64, half, float and double, so a bfloat16 tensor is rejected (eager, in
# tf.function and grouped alike). bf16 on the wire therefore travels as its raw 16-bit patterns
# (bitcast to int16, which HorovodAllgather accepts) and is summed locally in float32: the same
# scheme, bytes and arithmetic as torch_backend.


def _op(name: str):
    return aggregation.horovod_op(hvd, name)


def _wire(compression: str):
    return aggregation.wire_dtype(compression, tf.float16, tf.bfloat16)


class TFOps:
    """hvdllm/flat.py's array primitives on flat tf tensors (float32), for the core's ZeRO-1,
    local SGD and DeviceAdamW, run eagerly (their collectives go through Collectives' cached
    tf.functions: one trace per call site, none per step). Scalars stay 0-d tensors."""

    name = "tensorflow"

    @staticmethod
    def zeros(n: int) -> tf.Tensor:
        return tf.zeros([n], tf.float32)

    @staticmethod
    def concat(xs) -> tf.Tensor:
        return tf.concat(list(xs), 0)

    @staticmethod
    def sqnorms(x, groups) -> tf.Tensor:
        zero = tf.zeros([], tf.float64)
        return tf.stack([sum((tf.cast(tf.tensordot(x[s:e], x[s:e], 1), tf.float64) for s, e in spans), zero)
                         for spans in groups])

    sqrt = staticmethod(tf.sqrt)

    @staticmethod
    def minimum(x, c):
        return tf.minimum(x, c)

    @staticmethod
    def scale(x, s):
        return x * (tf.cast(s, x.dtype) if tf.is_tensor(s) else float(np.float32(s)))

    @staticmethod
    def from_host(a) -> tf.Tensor:
        return from_host(np.array(a, np.float32))

    @staticmethod
    def to_host(x) -> np.ndarray:
        return np.array(to_host(x))


class Collectives:
    """Collectives over one Horovod process set (a group of ranks from the Layout)."""

    ops = TFOps()   # the primitives of the tensors they move (hvdllm/flat.py)

    def __init__(self, process_set=None):
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self._fns = {}

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def _run(self, key, fn, tensors):
        """Horovod's TF ops take their name from the graph node. Executed eagerly the `name` is
        dropped (measured: rank 0's 'order.a' and rank 1's 'order.b' were silently summed), so
        eager calls run through a tf.function cached per call site: names hold, and ranks that
        disagree stall and get Horovod's error, as with torch."""
        if not tf.executing_eagerly():
            return fn(*tensors)
        key = key + tuple((t.dtype, t.shape.rank) for t in tensors)
        if key not in self._fns:
            sig = [tf.TensorSpec([None] * t.shape.rank, t.dtype) for t in tensors]
            self._fns[key] = tf.function(fn, input_signature=sig, autograph=False)
        return self._fns[key](*tensors)

    def _to_wire(self, t, compression):
        dtype = _wire(compression)
        return tf.cast(t, dtype) if dtype is not None and t.dtype.is_floating else t

    def _bf16_allreduce(self, tensor, op, name, prescale, postscale):
        if op == "adasum":
            raise ValueError("aggregation.compression='bf16' cannot be combined with aggregation.op='adasum'")
        if "GPU" in tensor.device.upper():   # NCCL reduces bfloat16 itself
            out = hvd.allreduce(tf.cast(tensor, tf.bfloat16), op=_op(op), name=name, prescale_factor=prescale,
                                postscale_factor=postscale, process_set=self.process_set)
            return tf.cast(out, tensor.dtype)
        bits = tf.bitcast(tf.cast(tf.cast(tensor, tf.float32) * prescale, tf.bfloat16), tf.int16)
        every = hvd.allgather(tf.reshape(bits, [1, -1]), name=name, process_set=self.process_set)
        total = tf.reduce_sum(tf.cast(tf.bitcast(every, tf.bfloat16), tf.float32), axis=0)
        if op == "average":
            total = total / self.size
        return tf.cast(tf.reshape(total * postscale, tf.shape(tensor)), tensor.dtype)

    def allreduce(self, tensor, op="average", name=None, compression="none", prescale=1.0, postscale=1.0):
        tensor = tf.convert_to_tensor(tensor)
        _op(op), _wire(compression)  # fail here, not inside a trace

        def fn(t):
            if compression == "bf16" and t.dtype.is_floating:
                return self._bf16_allreduce(t, op, name, prescale, postscale)
            out = hvd.allreduce(self._to_wire(t, compression), op=_op(op), name=name,
                                prescale_factor=prescale, postscale_factor=postscale,
                                process_set=self.process_set)
            return tf.cast(out, t.dtype)
        return self._run(("allreduce", op, name, compression, prescale, postscale), fn, [tensor])

    def grouped_allreduce(self, tensors, op="average", name=None, compression="none", prescale=1.0,
                          postscale=1.0):
        """One fused message for tensors of one dtype (Horovod requires a single dtype per group)."""
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        if compression == "bf16":
            return [self.allreduce(t, op, f"{name}.{i}", compression, prescale, postscale)
                    for i, t in enumerate(tensors)]
        _op(op), _wire(compression)

        def fn(*ts):
            outs = hvd.grouped_allreduce([self._to_wire(t, compression) for t in ts], op=_op(op),
                                         name=name, prescale_factor=prescale,
                                         postscale_factor=postscale, process_set=self.process_set)
            return [tf.cast(o, t.dtype) for o, t in zip(outs, ts)]
        return list(self._run(("grouped", op, name, compression, prescale, postscale), fn, tensors))

    def broadcast(self, tensor, root=0, name=None):
        """`root` is a rank within this set (0 = its first member). Horovod wants the global
        rank: passing 0 for a set without global rank 0 fails with 'invalid root rank'."""
        root_rank = self._global_rank(root)

        def fn(t):
            return hvd.broadcast(t, root_rank=root_rank, name=name, process_set=self.process_set)
        return self._run(("broadcast", root_rank, name), fn, [tf.convert_to_tensor(tensor)])

    def _global_rank(self, set_rank: int) -> int:
        ranks = self.process_set.ranks
        return ranks[set_rank] if ranks else set_rank

    def allgather(self, tensor, name=None):
        def fn(t):
            return hvd.allgather(t, name=name, process_set=self.process_set)
        return self._run(("allgather", name), fn, [tf.convert_to_tensor(tensor)])

    def barrier(self):
        """horovod.tensorflow has no barrier(): a one-integer allreduce every member must join."""
        self.allreduce(tf.zeros([1], tf.int32), op="sum", name="barrier").numpy()

    def reducescatter(self, tensor, op="average", name=None, compression="none"):
        """This rank's slice (first axis) of the reduction; bf16 reduces whole, then slices."""
        tensor = tf.convert_to_tensor(tensor)
        if compression == "bf16":
            full = self.allreduce(tensor, op=op, name=name, compression=compression)
            n = tensor.shape[0] // self.size
            return full[self.rank * n:(self.rank + 1) * n]
        _op(op)

        def fn(t):
            out = hvd.reducescatter(self._to_wire(t, compression), op=_op(op), name=name,
                                    process_set=self.process_set)
            return tf.cast(out, t.dtype)
        return self._run(("reducescatter", op, name, compression), fn, [tensor])


def init_horovod(comm=None, process_sets=()):
    """Start Horovod on mpi4py's communicator (MPI launchers) or from the environment (Gloo),
    registering one static process set per rank group (static: Horovod 0.28.1's dynamic sets are
    torn down under ranks still using them when another rank shuts down first).
    Returns (rank, size, local_rank, local_size, {ranks: ProcessSet})."""
    sets = {tuple(g): hvd.ProcessSet(list(g)) for g in process_sets}
    kwargs = {"process_sets": list(sets.values())} if sets else {}
    hvd.init(comm=comm, **kwargs) if comm is not None else hvd.init(**kwargs)
    return hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), sets


class NumpyCollectives(HostCollectives):
    """The same collectives on numpy arrays (hvdllm/engines.py HostCollectives), for what is on the
    host anyway (metrics, the stop agreement, snapshots, checkpoints' tp gathers); ZeRO-1 and
    local SGD use Collectives itself."""

    def __init__(self, coll: Collectives):
        super().__init__(coll, from_host, to_host)


# The host boundary: every host <-> tensor conversion of the engines goes through these two,
# so a test can count them per step (tests: host transfers per step).
TRANSFERS = {"to_host": 0, "from_host": 0}


def to_host(t) -> np.ndarray:
    """A tensor or variable as a numpy array (a copy)."""
    TRANSFERS["to_host"] += 1
    return t.numpy()


def from_host(a, dtype=None) -> tf.Tensor:
    TRANSFERS["from_host"] += 1
    return tf.constant(a, dtype=dtype)


def device_info() -> tuple[int, bool]:
    """(GPUs TensorFlow sees, Horovod built with NCCL): what hvdllm.device.choose decides from."""
    return len(tf.config.list_physical_devices("GPU")), bool(hvd.nccl_built())


def use_device(name: str) -> None:
    """Compute on `name` ('cpu' or 'cuda:i'); before any TF op runs. TF places every op on its
    visible GPU by itself, so a rank sees only its own GPU, and grows its memory as needed
    instead of taking all of it at start (the other ranks' GPUs stay untouched)."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:   # nothing to hide (and the runtime may be started already, e.g. in tests)
        return
    mine = [] if name == "cpu" else [gpus[int(name.split(":")[1])]]
    tf.config.set_visible_devices(mine, "GPU")
    for gpu in mine:
        tf.config.experimental.set_memory_growth(gpu, True)


__all__ = ["Collectives", "NumpyCollectives", "TFOps", "device_info", "from_host", "init_horovod", "to_host",
           "use_device"]
