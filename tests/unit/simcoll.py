"""A simulated k-rank collective in one process, for the unit tier.

`World(k).run(fn)` runs fn(rank) in k threads, one per simulated rank. `World.group(ranks)`
gives each member an object with the interface the core's strategies use from a backend's
Collectives (torch_backend/collectives.py, tf_backend/collectives.py): `.rank`, `.size`,
`allreduce`, `reducescatter`, `allgather`, `broadcast` (numpy in, numpy out), `barrier`, and
`.ops`, the array primitives of what it moves (hvdllm.flat.NUMPY). `backend(name)` runs the
same simulated wire under a backend's tensors: its `.group(world)` wraps each member so that the
strategies get and return torch or tf tensors and use that backend's own ops
(torch_backend.collectives.TorchOps, tf_backend.collectives.TFOps), i.e. their real tensor
path; only the wire in between is numpy.

Each collective is a rendezvous over a threading.Barrier with one slot per member: every member
writes its (kind, name, array), all wait, every member computes the result from all slots (in
rank order, so all members get bit-identical results), all wait again before a slot is reused.
Members that disagree on the kind, name, shape or dtype of a collective all get an error (as
Horovod's coordinator reports "Mismatched ..."); a member that never arrives breaks the barrier
after `timeout` seconds, so a bug fails the test instead of hanging it. An exception on one rank
aborts every barrier of the world: the other ranks fail at once and `run` re-raises the first
rank's exception.

The arithmetic follows Horovod's: sum / average / min / max in the tensor's dtype over the
members in rank order (average = sum / size); fp16 on the wire: cast, reduce, cast back;
bf16: 16-bit truncation-with-rounding of float32, accumulated in float32 (the torch adapter's
allgather emulation); reducescatter: the reduced tensor split along axis 0 into `size` nearly
equal pieces (the lower ranks get the larger ones), piece `rank` returned; allgather: the
members' tensors concatenated along axis 0 (first dimensions may differ).

`fault=` makes the simulator deliberately wrong, so tests can show that their checks fail when
a collective is wrong (see FAULTS).
"""
from __future__ import annotations

import threading

import numpy as np

from hvdllm.engines import HostCollectives
from hvdllm.flat import NUMPY

FAULTS = {
    "average_is_sum": "op='average' returns the sum (allreduce and reducescatter)",
    "reducescatter_wrong_shard": "reducescatter hands rank i the piece of rank (i+1) % size",
    "sum_is_local": "allreduce op='sum' returns this rank's own value (no reduction)",
    "allgather_reversed": "allgather concatenates the members in reverse rank order",
}


class CollectiveMismatch(RuntimeError):
    pass


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (round half to even), returned as float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


class Group:
    """The shared state of one group of simulated ranks (one Horovod process set)."""

    def __init__(self, world: "World", ranks: list[int]):
        self.world, self.ranks = world, list(ranks)
        self.barrier = threading.Barrier(len(ranks), timeout=world.timeout)
        self.slots: list = [None] * len(ranks)
        self.log: list[tuple[str, str | None]] = []   # (kind, name) of every collective, once

    def exchange(self, member: int, kind: str, name, payload):
        self.slots[member] = (kind, name, payload)
        self.barrier.wait()
        got = list(self.slots)
        if member == 0:
            self.log.append((kind, name))
        self.barrier.wait()
        keys = {(k, n) for k, n, _ in got}
        if len(keys) > 1:
            raise CollectiveMismatch(f"ranks {self.ranks} disagree on the collective: {sorted(keys, key=str)}")
        return [p for _, _, p in got]


class SimCollectives:
    """One member's view of a Group: a Collectives on numpy arrays."""

    ops = NUMPY

    def __init__(self, group: Group, member: int):
        self.group, self.member = group, member
        self.fault = group.world.fault

    @property
    def rank(self) -> int:
        return self.member

    @property
    def size(self) -> int:
        return len(self.group.ranks)

    # helpers ---------------------------------------------------------------------------------
    def _same_layout(self, arrays, what):
        if len({(a.shape, a.dtype.str) for a in arrays}) > 1:
            raise CollectiveMismatch(f"Mismatched {what} shapes or dtypes: "
                                     f"{[(a.shape, str(a.dtype)) for a in arrays]}")

    def _reduce(self, arrays, op, compression):
        dtype = arrays[0].dtype
        floating = np.issubdtype(dtype, np.floating)
        if compression not in ("none", "fp16", "bf16"):
            raise ValueError(f"aggregation.compression: {compression!r}")
        if op not in ("sum", "average", "min", "max"):
            raise ValueError(f"op {op!r} is not simulated")
        if compression == "bf16" and floating:
            wire = [_bf16(a.astype(np.float32)) for a in arrays]
        elif compression == "fp16" and floating:
            wire = [a.astype(np.float16) for a in arrays]
        else:
            wire = [a.copy() for a in arrays]
        if op in ("min", "max"):
            out = (np.minimum if op == "min" else np.maximum).reduce(wire)
        else:
            out = wire[0].copy()
            for w in wire[1:]:
                out += w
            if op == "average" and self.fault != "average_is_sum":
                out = out / out.dtype.type(len(arrays)) if floating else out // len(arrays)
        return out.astype(dtype)

    # the interface ---------------------------------------------------------------------------
    def allreduce(self, a, op="average", name=None, compression="none"):
        a = np.asarray(a)
        every = self.group.exchange(self.member, f"allreduce.{op}", name, a.copy())
        self._same_layout(every, "allreduce")
        if op == "sum" and self.fault == "sum_is_local":
            return a.copy()
        return self._reduce(every, op, compression)

    def reducescatter(self, a, op="average", name=None, compression="none"):
        a = np.asarray(a)
        every = self.group.exchange(self.member, f"reducescatter.{op}", name, a.copy())
        self._same_layout(every, "reducescatter")
        pieces = np.array_split(self._reduce(every, op, compression), self.size, axis=0)
        i = (self.member + 1) % self.size if self.fault == "reducescatter_wrong_shard" else self.member
        return pieces[i].copy()

    def allgather(self, a, name=None):
        a = np.asarray(a)
        every = self.group.exchange(self.member, "allgather", name, a.copy())
        if len({(x.shape[1:], x.dtype.str) for x in every}) > 1:
            raise CollectiveMismatch(f"Mismatched allgather shapes: {[x.shape for x in every]}")
        if self.fault == "allgather_reversed":
            every = every[::-1]
        return np.concatenate(every, axis=0)

    def broadcast(self, a, root=0, name=None):
        a = np.asarray(a)
        every = self.group.exchange(self.member, f"broadcast.{root}", name, a.copy())
        self._same_layout(every, "broadcast")
        return every[root].copy()

    def barrier(self):
        self.group.exchange(self.member, "barrier", None, None)


class World:
    """k simulated ranks. `group(ranks)` -> {global rank: SimCollectives} for a process set;
    `run(fn)` -> [fn(0), ..., fn(k-1)], each in its own thread."""

    def __init__(self, k: int, timeout: float = 10.0, fault: str | None = None):
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault {fault!r} is not one of {sorted(FAULTS)}")
        self.k, self.timeout, self.fault = k, timeout, fault
        self.groups: list[Group] = []

    def group(self, ranks=None) -> dict[int, SimCollectives]:
        ranks = list(range(self.k)) if ranks is None else list(ranks)
        g = Group(self, ranks)
        self.groups.append(g)
        return {r: SimCollectives(g, i) for i, r in enumerate(ranks)}

    def run(self, fn, timeout: float | None = None) -> list:
        results, errors = [None] * self.k, [None] * self.k

        def body(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:   # noqa: BLE001 - re-raised in the caller's thread
                errors[rank] = e
                for g in self.groups:    # the others fail now instead of at their timeout
                    g.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,), name=f"simrank{r}", daemon=True)
                   for r in range(self.k)]
        for t in threads:
            t.start()
        limit = timeout if timeout is not None else 6 * self.timeout
        for t in threads:
            t.join(limit)
        if any(t.is_alive() for t in threads):
            for g in self.groups:
                g.barrier.abort()
            raise AssertionError(f"simulated ranks {[r for r, t in enumerate(threads) if t.is_alive()]} "
                                 f"did not finish within {limit}s")
        first = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if first:
            raise first[0]
        if any(e is not None for e in errors):
            raise AssertionError(f"a collective timed out (after {self.timeout}s): ranks "
                                 f"{[r for r, e in enumerate(errors) if e is not None]} waited in vain")
        return results


def run_group(k: int, fn, fault: str | None = None, timeout: float = 10.0) -> list:
    """fn(comm) on each of k ranks of one group; returns the results in rank order."""
    world = World(k, timeout=timeout, fault=fault)
    comms = world.group()
    return world.run(lambda r: fn(comms[r]))


class TensorCollectives(HostCollectives):
    """A member's SimCollectives under a backend's tensors: tensors in, tensors out, the backend's
    `ops`; the simulated wire (and its faults) underneath, in numpy. HostCollectives turned the
    other way round: its conversions in are tensor -> numpy, out numpy -> tensor."""

    def __init__(self, sim: SimCollectives, backend: "Backend"):
        super().__init__(sim, from_host=backend.numpy, to_host=backend.tensor)
        self.ops = backend.ops

    def barrier(self):
        self.coll.barrier()


class Backend:
    """The vectors a strategy is run on: `tensor(ndarray)` makes one (a copy), `numpy(t)` reads
    one back (a copy), `ops` are the backend's primitives, `group(world, ranks)` is World.group
    with every member wrapped (numpy: unwrapped)."""

    def __init__(self, name, ops, tensor, numpy):
        self.name, self.ops, self.tensor, self.numpy = name, ops, tensor, numpy

    def group(self, world: World, ranks=None) -> dict:
        members = world.group(ranks)
        if self.name == "numpy":
            return members
        return {r: TensorCollectives(c, self) for r, c in members.items()}

    def __repr__(self):
        return self.name


BACKENDS = ("numpy", "torch", "tensorflow")
_loaded: dict[str, Backend] = {}


def backend(name: str) -> Backend:
    """numpy, torch or tensorflow (the calling test is skipped where the framework is missing)."""
    if name in _loaded:
        return _loaded[name]
    if name == "numpy":
        b = Backend(name, NUMPY, lambda a: np.array(a), lambda t: np.array(t))
    elif name == "torch":
        import torch

        from torch_backend.collectives import TorchOps
        b = Backend(name, TorchOps(), lambda a: torch.from_numpy(np.array(a)),
                    lambda t: np.array(t.detach().cpu().numpy()))
    elif name == "tensorflow":
        import tensorflow as tf

        from tf_backend.collectives import TFOps
        b = Backend(name, TFOps(), lambda a: tf.constant(np.array(a)), lambda t: np.array(t.numpy()))
    else:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    _loaded[name] = b
    return b


def run_group_on(b: Backend, k: int, fn, fault: str | None = None, timeout: float = 10.0) -> list:
    """run_group with every member's collectives on backend b's tensors."""
    world = World(k, timeout=timeout, fault=fault)
    comms = b.group(world)
    return world.run(lambda r: fn(comms[r]))
