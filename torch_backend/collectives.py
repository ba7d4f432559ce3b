"""Horovod collectives for torch tensors, with the same names and arguments as tf_backend's.

The aggregation rules (which op, which wire dtype) are the core's; this adapter only casts
and calls. `process_set=None` means Horovod's global set, passed explicitly, never implied.
"""
from __future__ import annotations

import collections

import horovod.torch as hvd
import numpy as np
import torch

from hvdllm import aggregation
from hvdllm.engines import HostCollectives

# Horovod 0.28's CPU ops reject bfloat16 tensors. bf16 on the wire therefore travels as its raw
# 16-bit patterns through an allgather and is summed locally in float32: half the bytes of an
# fp32 allreduce at dp=2 (n-1 copies of N halves vs 2(n-1)/n of N floats), with fp32 accumulation.


def _op(name: str):
    return aggregation.horovod_op(hvd, name)


def _wire(compression: str):
    return aggregation.wire_dtype(compression, torch.float16, torch.bfloat16)


class TorchOps:
    """hvdllm/flat.py's array primitives on flat torch tensors (float32 on `device`; None: the
    CPU), for the core's ZeRO-1, local SGD and DeviceAdamW. Scalars stay 0-d tensors: nothing
    here reads a value back."""

    name = "torch"

    def __init__(self, device=None):
        self.device = device

    def zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32, device=self.device or DEVICE)

    @staticmethod
    def concat(xs) -> torch.Tensor:
        return torch.cat(list(xs))

    def sqnorms(self, x, groups) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return torch.stack([sum((torch.dot(x[s:e], x[s:e]).double() for s, e in spans), zero) for spans in groups])

    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def adamw_(p, g, m, v, runs, lr: float, t: int, o) -> None:
        """optim.DeviceAdamW's step in place through torch's fused AdamW kernel (what
        torch.optim.AdamW(fused=True) runs), on views of the flat vectors: `runs` = (decayed,
        undecayed) spans, the two parameter groups. One pass over the four vectors, no
        temporaries."""
        step = torch.tensor(float(t), device=p.device)
        for spans, wd in zip(runs, (o.weight_decay, 0.0)):
            if spans:
                views = [[x[s:e] for s, e in spans] for x in (p, g, m, v)]
                torch._fused_adamw_(*views, [], [step] * len(spans), lr=lr, beta1=o.beta1, beta2=o.beta2,
                                    weight_decay=wd, eps=o.eps, amsgrad=False, maximize=False)

    @staticmethod
    def minimum(x, c):
        return x.clamp(max=c)

    @staticmethod
    def scale(x, s):
        return x * (s.to(x.dtype) if torch.is_tensor(s) else float(np.float32(s)))

    @staticmethod
    def scale_(x, s):
        """scale's product written into x (a vector its caller owns): no fresh vector to fault in."""
        return x.mul_(s.to(x.dtype) if torch.is_tensor(s) else float(np.float32(s)))

    def from_host(self, a) -> torch.Tensor:
        return from_host(np.array(a, np.float32), self.device)

    @staticmethod
    def to_host(x) -> np.ndarray:
        return np.array(to_host(x))


class Collectives:
    """Collectives over one Horovod process set (a group of ranks from the Layout)."""

    ops = TorchOps()   # the primitives of the tensors they move (hvdllm/flat.py)

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

    def _bf16_allreduce(self, tensor, op, name, prescale, postscale):
        if op == "adasum":
            raise ValueError("aggregation.compression='bf16' cannot be combined with aggregation.op='adasum'")
        if tensor.is_cuda:   # NCCL reduces bfloat16 itself
            out = hvd.allreduce(tensor.to(torch.bfloat16), op=_op(op), name=name, prescale_factor=prescale,
                                postscale_factor=postscale, process_set=self.process_set)
            return out.to(tensor.dtype)
        bits = (tensor.float() * prescale).to(torch.bfloat16).view(torch.int16).reshape(1, -1)
        every = hvd.allgather(bits, name=name, process_set=self.process_set)
        total = every.view(torch.bfloat16).float().sum(0).reshape(tensor.shape)
        if op == "average":
            total /= self.size
        return (total * postscale).to(tensor.dtype)

    def allreduce(self, tensor, op="average", name=None, compression="none", prescale=1.0, postscale=1.0):
        if compression == "bf16" and tensor.is_floating_point():
            return self._bf16_allreduce(tensor, op, name, prescale, postscale)
        wire = self._to_wire(tensor, compression)
        out = hvd.allreduce(wire, op=_op(op), name=name, prescale_factor=prescale,
                            postscale_factor=postscale, process_set=self.process_set)
        return out.to(tensor.dtype)

    def grouped_allreduce(self, tensors, op="average", name=None, compression="none", prescale=1.0,
                          postscale=1.0):
        if compression == "bf16":
            return [self.allreduce(t, op, f"{name}.{i}", compression, prescale, postscale)
                    for i, t in enumerate(tensors)]
        wire = [self._to_wire(t, compression) for t in tensors]
        outs = hvd.grouped_allreduce(wire, op=_op(op), name=name, prescale_factor=prescale,
                                     postscale_factor=postscale, process_set=self.process_set)
        return [o.to(t.dtype) for o, t in zip(outs, tensors)]

    def grouped_allreduce_(self, tensors, op="average", name=None, prescale=1.0, postscale=1.0):
        """In place, no wire cast: reuses the gradients' own memory instead of fresh outputs
        (measured: fresh >32 MiB outputs page-fault inside MPI, 0.3-0.5x mpi4py bandwidth)."""
        hvd.grouped_allreduce_(tensors, op=_op(op), name=name, prescale_factor=prescale,
                               postscale_factor=postscale, process_set=self.process_set)
        return tensors

    def reducescatter(self, tensor, op="average", name=None, compression="none"):
        """This rank's slice (first axis) of the reduction; bf16 reduces whole, then slices
        (see _bf16_allreduce)."""
        if compression == "bf16":
            full = self.allreduce(tensor, op=op, name=name, compression=compression)
            n = tensor.shape[0] // self.size
            return full[self.rank * n:(self.rank + 1) * n].clone()
        out = hvd.reducescatter(self._to_wire(tensor, compression), op=_op(op), name=name,
                                process_set=self.process_set)
        return out.to(tensor.dtype)

    def broadcast(self, tensor, root=0, name=None):
        """`root` is a rank within this group; Horovod wants the global rank, so translate."""
        ranks = self.process_set.ranks
        return hvd.broadcast(tensor, root_rank=ranks[root] if ranks else root, name=name,
                             process_set=self.process_set)

    def allgather(self, tensor, name=None):
        return hvd.allgather(tensor, name=name, process_set=self.process_set)

    def barrier(self):
        hvd.barrier(process_set=self.process_set)


def init_horovod(comm=None, process_sets=()):
    """Start Horovod on mpi4py's communicator (MPI launchers) or from the environment (Gloo),
    registering one process set per rank group (e.g. each pipeline stage's dp group).
    Returns (rank, size, local_rank, local_size, {ranks: ProcessSet})."""
    sets = {tuple(g): hvd.ProcessSet(list(g)) for g in process_sets}
    kwargs = {"process_sets": list(sets.values())} if sets else {}
    hvd.init(comm=comm, **kwargs) if comm is not None else hvd.init(**kwargs)
    return hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), sets


class NumpyCollectives(HostCollectives):
    """The same collectives on numpy arrays (hvdllm/engines.py HostCollectives), for what is on the
    host anyway (metrics, the stop agreement, snapshots, checkpoints' tp gathers); ZeRO-1 and
    local SGD use Collectives itself. On CPU torch.from_numpy shares memory."""

    def __init__(self, coll: Collectives):
        super().__init__(coll, from_host, to_host)


# The device every engine computes on (train.device through use_device); None: the CPU. One per
# process: a rank owns one GPU (hvdllm/device.py), and a module value reaches every engine,
# optimizer and collective without threading a device argument through each of them.
DEVICE = None


def device_info() -> tuple[int, bool]:
    """(GPUs torch sees, Horovod built with NCCL): what hvdllm.device.choose decides from."""
    return torch.cuda.device_count(), bool(hvd.nccl_built())


def use_device(name: str) -> None:
    """Compute on `name` ('cpu' or 'cuda:i') from now on; call before any engine is built."""
    global DEVICE
    if name == "cpu":
        DEVICE = None
        return
    DEVICE = torch.device(name)
    torch.cuda.set_device(DEVICE)   # Horovod's NCCL communicator and caching allocator use it


# The host boundary: every host <-> tensor conversion of the engines goes through these two,
# so a test can count them per step (tests: host transfers per step).
TRANSFERS = {"to_host": 0, "from_host": 0}


def to_host(t) -> np.ndarray:
    """A tensor as a numpy array (shares memory on CPU; copy it if it must outlive the tensor)."""
    TRANSFERS["to_host"] += 1
    return t.detach().cpu().numpy()


def pin_batch(x, y):
    """The prefetcher's hook (hvdllm/prefetch.py): on CUDA the batch in page-locked memory, still
    as numpy arrays (the engines' interface; each holds its pinned tensor), so from_host's copy
    to the device is non-blocking; elsewhere the batch as it is."""
    if not torch.cuda.is_available():
        return x, y
    pinned = tuple(torch.from_numpy(np.ascontiguousarray(a)).pin_memory() for a in (x, y))
    # the engines copy from a numpy view, which torch's pinned-memory cache does not track: were
    # the block freed when the trainer drops the batch, it could be reused while its copy is still
    # queued. The last few batches stay alive here; a step's collectives wait for its device work.
    _PINNED.append(pinned)
    return tuple(t.numpy() for t in pinned)


_PINNED: collections.deque = collections.deque(maxlen=8)


def pinned_empty(shape, dtype) -> np.ndarray:
    """A numpy array in page-locked memory (a received activation): its copy to the GPU is one
    DMA, without a staging copy (from_host(..., wait=True))."""
    return torch.empty(tuple(shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()


def to_host_pinned(t) -> np.ndarray:
    """to_host for what MPI sends from a GPU: one DMA into a pinned buffer, complete before the
    array is returned (MPI reads host memory, and knows nothing of CUDA streams)."""
    if t.device.type != "cuda":
        return to_host(t)
    TRANSFERS["to_host"] += 1
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t.detach(), non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return buf.numpy()


def from_host(a, device=None, wait=False) -> torch.Tensor:
    """A numpy array as a tensor on `device` (default: the engines' DEVICE). From pageable memory
    a non_blocking copy still returns only once the array is read, so the caller may reuse it.
    `wait`: return only when the copy is done, for a pinned array (pinned_empty): its copy would
    otherwise run after this returns, and nothing would keep its buffer from being reused."""
    TRANSFERS["from_host"] += 1
    t = torch.from_numpy(np.ascontiguousarray(a))
    device = device or DEVICE
    return t if device is None else t.to(device, non_blocking=not wait)
