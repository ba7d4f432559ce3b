"""A user's ordered list of torch layers (model.layers, see hvdllm/user_model.py) under data and
pipeline parallelism.

Every rank builds the whole list after seeding with train.seed (so ranks agree), runs one probe
forward (B=1, T=block_size) to check that the last layer returns logits and to learn every
parameter's shape, splits the list over the pipeline with parallel.partition, and keeps only its
own chunks. Then the same steps as torch_backend/pipeline.py: the core's Pipeline runs the
schedule; forward/backward per micro-batch (autograd keeps each micro-batch's graph until its
backward); after the last backward one grouped allreduce of this stage's gradients over its dp
process set (Horovod), one allreduce of the squared gradient norm over the pipeline (MPI) for
global clipping, and AdamW. With parallel.pp = 1 it is plain data parallelism (accumulating over
aggregation.accumulation micro-batches), with the same arithmetic, so np=1 is the reference.
With parallel.tp > 1, model.tp_plan turns the nn.Linear modules it names into column / row-parallel
ones (torch_backend/user_tp.py) after the split over the pipeline: split parameters' gradients
are local, replicated ones equal on every tp rank; the dp allreduce is unchanged, and the squared
gradient norm sums split parameters over the tp group and counts replicated ones once.
Checkpoints hold "{layer}.{name}" parameters and their AdamW moments: each (stage, tp rank)
writes its own, with the placement of every tp slice (checkpoint.py); state_dict() gathers the
whole model.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hvdllm import aggregation, user_model
from hvdllm.engine import StepResult
from hvdllm.engines import SequentialBase
from hvdllm.loss_scale import LossScaler
from hvdllm.strategies import pipeline as pl

from . import adamw_state, collectives, user_tp
from .collectives import Collectives, NumpyCollectives, from_host, to_host


class _Call(nn.Module):
    """A parameter-free callable in the list (e.g. a lambda)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def build_layers(model_cfg, seed: int) -> list[nn.Module]:
    layers = user_model.as_list(user_model.build(model_cfg, seed, torch.manual_seed),
                                (nn.Sequential, nn.ModuleList))
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            if not callable(layer):
                raise user_model.error(f"layer {i} is a {type(layer).__name__}, not an nn.Module or callable")
            layer = _Call(layer)
        out.append(layer)
    owners = {}
    for i, layer in enumerate(out):
        for p in layer.parameters():
            owners.setdefault(id(p), []).append(i)
    user_model.check_not_shared(owners)
    return out


def probe(layers, model_cfg) -> list:
    """One forward of a (2, block_size) token batch: builds nothing in torch, but checks the
    contract (one tensor per layer, logits last) and gives each layer's input activation."""
    x = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.block_size), generator=torch.Generator().manual_seed(0))
    inputs = [x]
    with torch.no_grad():
        for layer in layers:
            layer.eval()
            inputs.append(layer(inputs[-1]))
            if not torch.is_tensor(inputs[-1]):
                raise user_model.error(f"layer {len(inputs) - 2} returned a {type(inputs[-1]).__name__}, "
                                       f"not one tensor")
    user_model.check_logits(tuple(inputs[-1].shape), model_cfg.vocab_size)
    return inputs


def autocast_dtype(precision: str):
    """The autocast dtype of train.precision over a layer list (None: float32 throughout)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _run(layers, x, dtype=None):
    """The layers in order; with `dtype` (train.precision = 'bf16' / 'fp16') under
    torch.autocast, as the built-in GPT computes, the output back in float32 (the loss, and a
    pipeline stage's activation on the wire, stay float32)."""
    if dtype is None:
        for layer in layers:
            x = layer(x)
        return x
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        for layer in layers:
            x = layer(x)
    return x.float()


def measure_layer_times(layers, inputs) -> list[float]:
    """Forward+backward seconds per layer (best of 3), each from its real input activation."""
    times = []
    for layer, inp in zip(layers, inputs):
        best = float("inf")
        for _ in range(3):
            x = inp if not inp.is_floating_point() else inp.detach().requires_grad_(True)
            t0 = time.perf_counter()
            out = layer(x)
            if out.requires_grad:
                out.float().pow(2).mean().backward()
            best = min(best, time.perf_counter() - t0)
        for p in layer.parameters():
            p.grad = None
        times.append(best)
    return times


class SequentialEngine(SequentialBase):
    """A user's layer list under dp, pp and tp (see the module docstring)."""

    def __init__(self, cfg, layout, rt):
        self._settings(cfg, layout)
        m = cfg.model
        layers = build_layers(m, cfg.train.seed)
        inputs = probe(layers, m)
        self.param_shapes = {f"{i}.{n}": tuple(p.shape) for i, layer in enumerate(layers)
                             for n, p in layer.named_parameters()}
        self._place_on_pipeline(rt, [float(sum(p.numel() for p in layer.parameters())) for layer in layers],
                                lambda: measure_layer_times(layers, inputs[:-1]))
        n_layers = len(layers)
        mine = sorted(i for c in self.chunks for i in c)
        self.layers = {i: layers[i].train() for i in mine}  # the other ranks' layers are dropped
        self.tp, placements = user_tp.apply(cfg, layout, rt, layers, self.layers, inputs)
        # tp-split parameter names (a row-parallel bias has a placement entry of None: replicated)
        self.split = {n for n, pl in placements.items() if pl is not None}
        self.placements = user_model.with_moments(placements)
        layers = inputs = None   # the other ranks' layers and the probe's activations are freed
        if collectives.DEVICE is not None:   # train.device: checked on the CPU above, run there
            for layer in self.layers.values():
                layer.to(collectives.DEVICE)
        self.named = [(f"{i}.{n}", p) for i in mine for n, p in self.layers[i].named_parameters()]
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.comm = Collectives(rt.process_set(layout.group("dp")))
        self.ncomm = NumpyCollectives(self.comm)
        self._broadcast_parameters()
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.opt = adamw_state.make_adamw(self.named, cfg.optim)
        # bf16 / fp16: the layers under autocast; fp16's loss scaled (user_model.clip_or_skip says how)
        self.dtype = autocast_dtype(cfg.train.precision)
        self.scaler = LossScaler() if cfg.train.precision == "fp16" else None
        self.saved = {}
        self._describe(n_layers)

    def _broadcast_parameters(self):
        """The dp group's first rank's weights win (one message), should a builder not be seeded."""
        if self.comm.size == 1 or not self.named:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for _, p in self.named])
            flat = self.comm.broadcast(flat, root=0, name="seq.init")
            torch.nn.utils.vector_to_parameters(flat, [p for _, p in self.named])

    def _run_chunk(self, chunk, x):
        return _run([self.layers[i] for i in self.chunks[chunk]], x, self.dtype)

    @staticmethod
    def _loss(logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    # StageRunner (pipeline) -------------------------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        x = from_host(inp)
        if self.chunks[chunk][0] != 0:
            x.requires_grad_(True)
        out = self._run_chunk(chunk, x)
        if target is None:
            self.saved[(mb, chunk)] = (x, out)
            return to_host(out)
        loss = self._loss(out, from_host(target))
        self.saved[(mb, chunk)] = (x, user_model.scaled(self, loss / self.m))
        return float(loss.detach())

    def backward(self, chunk, mb, grad):
        x, out = self.saved.pop((mb, chunk))
        out.backward(None if grad is None else from_host(grad))
        return to_host(x.grad) if x.requires_grad else None

    # one optimizer step -------------------------------------------------------------------------
    def train_step(self, x, y, lr) -> StepResult:
        for layer in self.layers.values():
            layer.train()
        for _, p in self.named:
            p.grad = None
        self._step_scale()   # fp16: the scale, or the testing aid's overflow on this rank
        norm = []
        if self.pipe is not None:
            loss = self.pipe.run(self, np.split(x, self.m), np.split(y, self.m),
                                 lambda: norm.append(self._reduce_and_step(lr)))
        else:
            loss = 0.0
            for xm, ym in aggregation.split_microbatches(x, y, self.m):
                part = self._loss(self._run_chunk(0, from_host(xm)), from_host(ym)) / self.m
                user_model.scaled(self, part).backward()
                loss += float(part.detach())
            norm.append(self._reduce_and_step(lr))
        mean = self.comm.allreduce(torch.tensor([loss], dtype=torch.float64), op="average", name="seq.loss")
        skipped = user_model.update_scaler(self.scaler, norm[0])
        return StepResult(loss=float(mean), grad_norm=norm[0], skipped=skipped)

    def _reduce_and_step(self, lr) -> float:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.named]
        user_model.inject_overflow(self, grads)
        if self.comm.size > 1 and grads:
            grads = self.comm.grouped_allreduce(grads, name="seq.grads", **self.reduce.kwargs())
        for (_, p), g in zip(self.named, grads):
            p.grad = g
        sq = user_model.grad_norm_sq(((n, float(g.double().pow(2).sum())) for (n, _), g in zip(self.named, grads)),
                                     self.split, user_tp.tp_sum(self.tp))
        if self.pipe is not None:
            sq = pl.allreduce_sum(self.pp_comm, sq, self.timeout, "pipeline grad-norm allreduce")
        norm, coef = user_model.clip_or_skip(float(np.sqrt(sq)), self.cfg.optim.grad_clip, self.scaler)
        if coef is None:   # fp16: an overflow somewhere in the job, which every rank sees: no update
            return norm
        if grads:
            torch._foreach_mul_(grads, coef)
        adamw_state.set_lr(self.opt, lr)
        self.opt.step()
        return norm

    # evaluation ---------------------------------------------------------------------------------
    def _forward_all(self, x: np.ndarray):
        """Logits (numpy) of the whole list on the last stage's owner, None elsewhere."""
        for layer in self.layers.values():
            layer.eval()
        with torch.no_grad():
            if self.pipe is None:
                return to_host(self._run_chunk(0, from_host(x)))
            return self.pipe.forward_only(lambda c, a: to_host(self._run_chunk(c, from_host(a))), x)

    @torch.no_grad()
    def score(self, out, y) -> tuple[float, int, int]:
        logits, t = from_host(out), from_host(y)
        return float(self._loss(logits, t)) * t.numel(), int((logits.argmax(-1) == t).sum()), t.numel()

    # state: "{layer}.{name}", gathered over the pipeline so a checkpoint is the whole model ---
    def _local_state(self) -> dict:
        local = self.host_params()
        local.update(self.optimizer_state())
        return local

    def load_state_dict(self, state) -> None:
        """From whole arrays (a dict) or a checkpoint.Sharded: this rank's slices."""
        names = [n for n, _ in self.named]
        state = user_model.load_slices(state, names, names, self.param_shapes, self.placements,
                                       self.cfg.model.layers)
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(from_host(np.asarray(state[n], np.float32)))
        adamw_state.load(self.opt, self.named, state)

    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    tp_allgather = staticmethod(user_tp.allgather)

    def optimizer_state(self) -> dict:
        return adamw_state.export(self.opt, self.named)
