"""The torch side of pipeline parallelism: this rank's model chunks, their forward and backward
per micro-batch (autograd keeps each micro-batch's graph until its backward), and the step.

The schedule, the messages and their order live in hvdllm/strategies/pipeline.py. After the last
backward this engine sends, in order: the tied-embedding gradient exchange between the first and
last pipeline ranks (p2p, so both copies of `wte` stay identical), one grouped allreduce of every
gradient over this stage's dp process set (Horovod), one allreduce of the squared gradient norm
over the pipeline (MPI) for global clipping; then AdamW. Loss: broadcast from the last stage.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from hvdllm import device, task
from hvdllm.engines import PipelineStageBase
from mpi import p2p

from . import adamw_state, collectives
from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, pinned_empty, to_host, to_host_pinned
from .engine import Engine
from .model import GPT
from .tensor_parallel import norm_sq


def measure_layer_times(model_cfg, seed: int, batch: int) -> list[float]:
    """Forward+backward seconds per layer on this process (for parallel.partition='time')."""
    model = GPT(model_cfg, seed)
    dev = model.plist[0].device
    x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size), device=dev)
    times = []
    for i in model.layers:
        inp = x if i == 0 else torch.randn(batch, model_cfg.block_size, model_cfg.n_embd, requires_grad=True,
                                           device=dev)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            model.run_layer(i, inp).float().pow(2).mean().backward()
            if dev.type == "cuda":   # the layer's kernels done, not only queued
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


def device_empty(shape, dtype) -> torch.Tensor:
    """A received activation's buffer on this rank's GPU (a CUDA-aware MPI writes it there)."""
    return torch.empty(tuple(shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device=collectives.DEVICE)


def device_send(t) -> torch.Tensor:
    """A GPU tensor as a CUDA-aware MPI may read it: detached (the array interface refuses a
    tensor that needs grad), contiguous, and computed (MPI knows nothing of CUDA streams)."""
    t = t.detach().contiguous()
    torch.cuda.current_stream(t.device).synchronize()
    return t


def received(a) -> torch.Tensor:
    """An activation from the previous stage on this rank's device: a tensor already there, or a
    host array copied over."""
    return a if torch.is_tensor(a) else from_host(a, wait=True)


def set_transport(engine, layout) -> None:
    """How a stage's activations and their gradients cross to the next stage over MPI: host
    arrays on a CPU; from a GPU the device tensors themselves where the MPI is CUDA-aware, else
    pinned host buffers (one DMA each way). Sets engine.send_form and its pipe's alloc."""
    on_gpu = collectives.DEVICE is not None
    aware = on_gpu and p2p.cuda_aware()
    engine.send_form = device_send if aware else to_host_pinned if on_gpu else to_host
    if on_gpu:
        engine.pipe.alloc = device_empty if aware else pinned_empty
    device.log_transport(layout, device.p2p_transport(on_gpu, aware))


class PipelineEngine(PipelineStageBase):
    """This rank's stage of the built-in GPT; the step itself is PipelineStageBase's."""

    def __init__(self, cfg, layout, rt, tp=None):
        layers = self._place(cfg, layout, rt, tp, measure_layer_times)
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.model = GPT(task.model_config(cfg), cfg.train.seed, layers=layers, tp=self.tp)
        self.model.configure(cfg.train)   # checkpointing, precision
        # task.kind = 'classify': the last stage's head layer is the Classifier's (it pools with the lengths)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self.named = self.model.named()
        self.saved = {}
        self._strategies(Collectives(rt.process_set(layout.group("dp"))), NumpyCollectives,
                         lambda: adamw_state.make_adamw(self.named, cfg.optim))
        set_transport(self, layout)

    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)
    assign = staticmethod(Engine.assign)
    concat_flat = staticmethod(Engine.concat_flat)
    assign_flat = staticmethod(Engine.assign_flat)
    optimizer_state = Engine.optimizer_state
    load_optimizer_state = Engine.load_optimizer_state

    def start_step(self):
        self.model.train()
        for _, p in self.named:
            p.grad = None

    def stage_grads(self) -> list:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.named]

    def norm_sq(self, named_grads) -> float:
        return float(norm_sq(named_grads, self.tp))

    def apply_update(self, grads, coef: float, lr: float) -> None:
        for (_, p), g in zip(self.named, grads):
            p.grad = g
        torch._foreach_mul_(grads, coef)
        adamw_state.set_lr(self.opt, lr)
        self.opt.step()

    # StageRunner --------------------------------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        x = received(inp)
        if self.chunks[chunk][0] != 0:
            x.requires_grad_(True)
        out = self.model.run_layers(self.body[chunk], x)
        if target is None:
            self.saved[(mb, chunk)] = (x, out)
            return self.send_form(out)
        if self.head is not None:   # classify: the target is [label, length] per example
            y = from_host(target)
            loss = self.head.loss_of(self.head.head(out, y), y)
        else:
            loss = self.model.loss_from_logits(out, from_host(target))
        self.saved[(mb, chunk)] = (x, self.backward_loss(loss))
        return loss.detach().double()   # summed over micro-batches in float64, as a float would be

    def backward(self, chunk, mb, grad):
        x, out = self.saved.pop((mb, chunk))
        out.backward(None if grad is None else received(grad))
        return self.send_form(x.grad) if x.requires_grad else None

    # evaluation and generation ---------------------------------------------------------------
    @torch.no_grad()
    def forward_chunk(self, chunk, a) -> np.ndarray:
        self.model.eval()
        return to_host(self.model.run_layers(self.body[chunk], from_host(a)))

    @torch.no_grad()
    def score(self, out, y):
        if self.head is not None:   # classify: loss sum, correct, examples, then the logits
            y = from_host(y)
            r = self.head.scores(self.head.head(from_host(out), y), y)
            return np.concatenate([[r.loss_sum, r.correct, r.tokens], r.logits.reshape(-1)])
        logits, t = from_host(out), from_host(y).reshape(-1)
        full = self.model.full_logits(logits).reshape(-1, self.model.table)
        return float(self.model.loss_from_logits(logits, t)) * t.numel(), int((full.argmax(-1) == t).sum()), t.numel()

    def whole_model_logits(self, state):
        full = GPT(self.cfg.model, self.cfg.train.seed).eval()
        for n, p in full.named():
            Engine.assign(p, np.asarray(state[n], np.float32))

        @torch.no_grad()
        def last_logits(ids):
            return to_host(full(from_host(np.array([ids], dtype=np.int64)))[0, -1].double())
        return last_logits
