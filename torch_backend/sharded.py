"""The torch ShardedEngine: ZeRO-2 / ZeRO-3 (hvdllm/strategies/zero_sharded.py drives the step;
this file supplies its per-unit primitives on the torch model).

A unit's forward runs on a detached input that requires grad and keeps its autograd graph; its
backward is torch.autograd.grad of the unit's output with the incoming gradient, for the unit's
parameters and its input (the pipeline engine's chunk trick, per unit). Under ZeRO-3 a unit's
parameters exist only while it runs: between its forward and its backward the graph is kept and
the parameters point to storage-less husks; before the backward they point into the unit's
gathered vector again, set through `.data` (PyTorch FSDP1's trick), so autograd's version
counters do not move and the saved tensors read the same values. (Alone, dp = 1, the storage is
resized to 0 and refilled instead: see __init__.) Gathers are issued one unit ahead with Horovod's
allgather_async and waited for with synchronize just before the unit runs (not under tp: see
__init__).
"""
from __future__ import annotations

import horovod.torch as hvd
import numpy as np
import torch

from hvdllm import lora, task
from hvdllm.strategies.zero_sharded import ShardedEngineBase, ShardedStageBase

from . import lora as lora_backend
from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .engine import Engine
from .model import GPT, _storageless
from .pipeline import PipelineEngine, measure_layer_times, received, set_transport
from .tensor_parallel import TPGroup


class ShardedEngine(ShardedEngineBase):
    """The built-in GPT under parallel.zero = 2 or 3 (with tp slices inside)."""

    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self._groups(cfg, layout, collectives or Collectives(), tp, NumpyCollectives)
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        # ZeRO-3: parameters without storage (torch's own, resizable), filled unit by unit; under
        # LoRA the frozen base is built whole and only the adapters are sharded (zero_sharded.units_for)
        zero3 = cfg.parallel.zero == 3
        self.model = GPT(task.model_config(cfg), cfg.train.seed, tp=self.tp,
                         materialise=not zero3 or lora.enabled(cfg))
        self.model.configure(cfg.train)   # activation checkpointing, precision: as the Engine's
        # task.kind = 'classify': the last unit is the head's pooling and loss (torch_backend/classify.py)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.named = self.model.named()
        if lora.enabled(cfg):   # only the adapters (and a classifier's head) train
            self.base_named, self.lora = self.named, True
            self.named = lora_backend.attach(self.model, cfg)
            if zero3:   # torch-owned storage (from_numpy's is not resizable): ZeRO-3 frees it
                for _, p in self.named:
                    p.data = p.data.clone()
        self.by_name = dict(self.named)
        # Measured at np=2 on a 2-core CPU shared with other jobs (6 blocks of width 256, T=64,
        # batch 8, zero=3, interleaved runs): gathering ahead 875 / 1015 / 1449 ms per step,
        # synchronously 763 / 1083 / 1339 ms: no gain within the noise, for one unit more held
        # (peak parameter bytes 16.0 vs 12.8 MB). On CPU the gather competes with the compute for
        # the same cores; an accelerator's copy engine is where the overlap would pay.
        # Gathers ahead only without tp: an allgather of the dp set still in flight while the
        # unit's tp allreduces run lets each rank's Horovod thread take the two process sets'
        # ops in its own order, and four ranks waited on each other in a cycle (seen at dp2 x tp2).
        # ZeRO-3 over dp ranks: a unit's parameters point into its freshly gathered vector
        # (`.data =` keeps the tensor object and its version counter, so the graph kept between
        # forward and backward reads the gathered values) and back to their storage-less husk
        # when freed: copying each unit in, twice per micro-batch, was the largest cost after
        # the optimizer (np=2, 8 blocks of 512: 83 ms of a 1.35 s step). Alone (dp = 1) the
        # "gathered" vector is the master shard itself, which the parameters must not alias:
        # there they are copied in.
        self.husks = {n: _storageless(p.shape) for n, p in self.named} if zero3 and self.comm.size > 1 else {}
        if self.comm.size > 1 and self.tp is None:
            ps = self.comm.process_set
            self.gather_async = (lambda t, name: hvd.allgather_async(t, name=name, process_set=ps),
                                 hvd.synchronize)
        self._shard_model()

    # backend primitives (hvdllm/engines.py, zero_sharded.py) --------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    assign = staticmethod(Engine.assign)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)

    def grad_flat(self, tensors) -> torch.Tensor:
        """A unit's gradients joined into one buffer kept for the next unit (ZeroSharded calls it
        only where its reduce-scatter makes a vector of its own): a fresh unit-sized vector each
        time cost 3x the copy in page faults under bench memory's allocator (27 vs 8 ms for
        12.7M elements)."""
        n = sum(t.numel() for t in tensors)
        buf = getattr(self, "_grad_buf", None)
        if buf is None or buf.numel() < n:
            buf = self._grad_buf = torch.empty(n, dtype=torch.float32, device=tensors[0].device)
        return torch.cat([t.detach().reshape(-1) for t in tensors], out=buf[:n])

    def shape_of(self, name: str) -> tuple:
        return tuple(self.by_name[name].shape)

    @torch.no_grad()
    def load_unit(self, names, flat) -> None:
        for n, piece in zip(names, flat.split([self.by_name[n].numel() for n in names])):
            p = self.by_name[n]
            if n in self.husks:       # ZeRO-3 over dp ranks: the gathered vector's view, no copy
                p.data = piece.view_as(p)
                continue
            if p.untyped_storage().size() == 0:   # ZeRO-3 alone: the freed storage back, same object
                if p.untyped_storage().resizable():
                    p.untyped_storage().resize_(p.numel() * p.element_size())
                else:   # a storage torch cannot resize (met for a LoRA head in a long test process): a new one
                    p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            p.data.copy_(piece.view_as(p))        # through .data: no version-counter bump

    def free_unit(self, names) -> None:
        for n in names:
            if n in self.husks:
                self.by_name[n].data = self.husks[n]
            else:
                self.by_name[n].untyped_storage().resize_(0)

    def micro(self, x, y):
        xs, ys = from_host(np.asarray(x, np.int64)), from_host(np.asarray(y, np.int64))
        b = xs.shape[0] // self.k
        return xs.split(b), ys.split(b)

    def unit_forward(self, u, x, target):
        self.model.train()
        if u:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():   # run_layers: a block recomputes in backward under 'full' checkpointing
            if target is not None and self.head is not None:   # classify: ln_f, pooling, head, loss
                out = self.head.loss_of(self.head.head(x, target), target) / self.k
            else:
                out = self.model.run_layers([u], x)
                if target is not None:
                    out = self.model.loss_from_logits(out, target) / self.k
        return out.detach(), (x, out)

    def unit_backward(self, u, handle, dy):
        x, out = handle
        if isinstance(dy, float):   # the loss's backward from fp16's loss scale (zero_sharded.Runner)
            dy = torch.full_like(out, dy)
        sources = [self.by_name[n] for n in self.uses[u]] + ([x] if u else [])
        grads = torch.autograd.grad(out, sources, grad_outputs=dy, allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(sources, grads)]
        return (grads[-1] if u else None), grads[:len(self.uses[u])]

    # evaluation and generation --------------------------------------------------------------
    def tokens(self, ids):
        return from_host(np.asarray(ids, np.int64))

    @torch.no_grad()
    def eval_unit(self, u, x):
        self.model.eval()
        return self.model.run_layer(u, x)

    def evaluate(self, x, y):
        """classify: the blocks unit by unit, then the head on their output (its pooling reads y's
        lengths); a language model's: ShardedEngineBase's."""
        if self.head is None:
            return ShardedEngineBase.evaluate(self, x, y)
        yt, last = from_host(np.asarray(y, np.int64)), len(self.uses) - 1
        with torch.no_grad():
            self.model.eval()
            return self.zero.forward_only(
                lambda u, h: self.head.scores(self.head.head(h, yt), yt) if u == last else self.eval_unit(u, h),
                self.tokens(x), self)

    @torch.no_grad()
    def score(self, logits, y):
        t = from_host(np.asarray(y, np.int64)).reshape(-1)
        loss_sum = self.model.loss_from_logits(logits, t) * t.numel()
        full = self.model.full_logits(logits)
        correct = (full.reshape(-1, full.shape[-1]).argmax(-1) == t).sum()
        return float(loss_sum), int(correct), int(t.numel())

    @torch.no_grad()
    def last_logits(self, ids) -> np.ndarray:
        logits = self.model.full_logits(self.logits(np.array([ids], dtype=np.int64)))
        return to_host(logits[0, -1].double())


class ShardedPipelineEngine(ShardedStageBase):
    """A pipeline stage of the built-in GPT under parallel.zero = 2 or 3 (ShardedStageBase):
    ShardedEngine's unit primitives on the stage's layers, PipelineEngine's transport."""

    def __init__(self, cfg, layout, rt, tp=None):
        layers = self._place(cfg, layout, rt, tp, measure_layer_times)
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.model = GPT(task.model_config(cfg), cfg.train.seed, layers=layers, tp=self.tp,
                         materialise=cfg.parallel.zero == 2)
        self.model.configure(cfg.train)
        # task.kind = 'classify': the last stage's head unit is the Classifier's (PipelineEngine's)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.named = self.model.named()
        self.by_name = dict(self.named)
        comm = Collectives(rt.process_set(layout.group("dp")))
        # ZeRO-3 over dp ranks: parameters point into each gathered vector (ShardedEngine says why)
        self.husks = {n: p.data for n, p in self.named} if cfg.parallel.zero == 3 and comm.size > 1 else {}
        self._stage_strategies(comm, NumpyCollectives)
        set_transport(self, layout)

    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)
    grad_flat = ShardedEngine.grad_flat
    shape_of = ShardedEngine.shape_of
    load_unit = ShardedEngine.load_unit
    free_unit = ShardedEngine.free_unit
    unit_forward = ShardedEngine.unit_forward
    unit_backward = ShardedEngine.unit_backward
    tokens = ShardedEngine.tokens
    eval_unit = ShardedEngine.eval_unit
    whole_model_logits = PipelineEngine.whole_model_logits
    stage_input = staticmethod(received)

    def stage_output(self, t):
        return self.send_form(t)

    @staticmethod
    def loss_value(t):
        return t.double()   # summed over micro-batches in float64 (PipelineEngine.forward's)

    def score(self, out, y):
        if self.head is not None:   # classify: the head's pooling and scores, as the unsharded stage's
            return self.head_scores(lambda: PipelineEngine.score(self, out, y))
        return ShardedEngine.score(self, from_host(out), y)
