"""The torch ShardedSequentialEngine: a user's layer list (model.layers) under ZeRO-2 / ZeRO-3,
one unit per layer (hvdllm/strategies/zero_layers.py says what a unit is; zero_sharded.py drives
the step). The per-unit primitives are torch_backend/sharded.py's (autograd.grad per unit, the
storage-less husks of ZeRO-3, the gathers issued one unit ahead); only the unit's computation
differs: the layers of the unit in order, and for the last unit the mean cross-entropy, as
torch_backend/sequential.py computes it. Start-up (stage 3): the built list's parameters are
read unit by unit and their storage freed (resized to 0: the parameter objects, and the autograd
graph's view of them, stay)."""
from __future__ import annotations

import numpy as np
import torch

from hvdllm.strategies.zero_layers import ShardedLayersBase

from . import collectives
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .sequential import SequentialEngine, _run, autocast_dtype, build_layers, probe
from .sharded import ShardedEngine


class ShardedSequentialEngine(ShardedLayersBase, ShardedEngine):
    """model.layers under parallel.zero = 2 or 3 (data parallel only)."""

    def __init__(self, cfg, layout, rt):
        self._groups(cfg, layout, Collectives(rt.process_set(layout.group("dp"))), None, NumpyCollectives)
        self.layers = build_layers(cfg.model, cfg.train.seed)
        probe(self.layers, cfg.model)
        # fp16: the layers under autocast, as SequentialEngine's; the loss scale is ZeroSharded's
        self.dtype = autocast_dtype(cfg.train.precision)
        if collectives.DEVICE is not None:   # train.device: checked on the CPU above, run there
            for layer in self.layers:
                layer.to(collectives.DEVICE)
        self.names_per_layer = [[f"{i}.{n}" for n, _ in layer.named_parameters()]
                                for i, layer in enumerate(self.layers)]
        self.named = [(f"{i}.{n}", p) for i, layer in enumerate(self.layers) for n, p in layer.named_parameters()]
        self.by_name = dict(self.named)
        self.param_shapes = {n: tuple(p.shape) for n, p in self.named}
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.husks = {}
        if self.comm.size > 1:   # no tp here: the gathers can always run one unit ahead
            ps = self.comm.process_set
            import horovod.torch as hvd
            self.gather_async = (lambda t, name: hvd.allgather_async(t, name=name, process_set=ps),
                                 hvd.synchronize)
        self._shard_layers()
        if cfg.parallel.zero == 3 and self.comm.size > 1:   # freed storage: the husks (sharded.py)
            self.husks = {n: p.data for n, p in self.named}
        self._describe()

    @torch.no_grad()
    def free_built(self, names) -> None:
        for n in names:
            self.by_name[n].untyped_storage().resize_(0)

    def _unit_modules(self, u, training: bool):
        mods = [self.layers[i] for i in self.unit_layers[u]]
        for m in mods:
            m.train(training)
        return mods

    def unit_forward(self, u, x, target):
        mods = self._unit_modules(u, True)
        if u:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = _run(mods, x, self.dtype)
            if target is not None:
                out = SequentialEngine._loss(out, target) / self.k
        return out.detach(), (x, out)

    @torch.no_grad()
    def eval_unit(self, u, x):
        return _run(self._unit_modules(u, False), x, self.dtype)

    @torch.no_grad()
    def score(self, logits, y):
        t = from_host(np.asarray(y, np.int64))
        return (float(SequentialEngine._loss(logits, t)) * t.numel(), int((logits.argmax(-1) == t).sum()),
                int(t.numel()))

    @torch.no_grad()
    def last_logits(self, ids) -> np.ndarray:
        return to_host(self.logits(np.array([ids], dtype=np.int64))[0, -1].double())
