"""The torch Engine: forward/backward, gradient aggregation, clipping and the optimizer step.

Which messages a step sends depends on the strategy (each documented in its core file):
- data parallel (default): one grouped allreduce of every gradient over the dp process set;
- ZeRO-1 (parallel.zero=1): hvdllm/strategies/zero.py (reducescatter, norm allreduce, allgather);
- local SGD (localsgd.every=H): no gradient messages; every H steps hvdllm/strategies/local_sgd.py.
Then one allreduce of the scalar loss, for logging.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hvdllm import aggregation, lora, task
from hvdllm.engine import EvalResult, StepResult
from hvdllm.engines import GPTEngineBase
from hvdllm.flat import FlatLayout
from hvdllm.loss_scale import LossScaler
from hvdllm.optim import clip_coef
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies.local_sgd import LocalSGD
from hvdllm.strategies.zero import Zero1

from . import adamw_state, collectives
from . import lora as lora_backend
from .classify import Classifier
from .collectives import Collectives, NumpyCollectives, from_host, to_host
from .model import GPT
from .tensor_parallel import TPGroup, norm_sq


def configure(threads: int, seed: int = 0) -> None:
    """Set compute threads before any work (0 = torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(max(1, min(threads, 2)))
        except RuntimeError:  # already set once in this process
            pass


def matmul_flops(precision: str = "fp32", n: int = 512) -> float:
    """FLOP/s of an n x n matrix product on this rank's compute threads, in the run's precision
    (hvdllm/mfu.py: the peak a CPU run's MFU is measured against); the best of 5 timings."""
    import time
    dev = collectives.DEVICE
    if dev is not None:   # a GPU: a product big enough to reach its peak, timed to completion
        n = max(n, 4096)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        if dev is not None:
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class Engine(GPTEngineBase):
    """The built-in GPT under data parallelism (with tp layers, ZeRO-1 or local SGD inside)."""

    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self.cfg = cfg
        self.layout = layout
        self.comm = collectives or Collectives()
        self.ncomm = NumpyCollectives(self.comm)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.tp_ncomm = NumpyCollectives(self.tp.coll) if self.tp else None
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.model = GPT(task.model_config(cfg), cfg.train.seed, tp=self.tp)
        self.model.configure(cfg.train)   # checkpointing, precision
        # task.kind = 'classify': the head's loss and evaluation (torch_backend/classify.py)
        self.head = Classifier(self.model, cfg.task) if task.is_classify(cfg) else None
        self._loss = self.head.loss if self.head is not None else self.model.loss
        self.named = self.model.named()
        if lora.enabled(cfg):   # only the adapters (and a classifier's head) train
            self.base_named, self.lora = self.named, True
            self.named = lora_backend.attach(self.model, cfg)
        self._broadcast_parameters()
        self.params = [p for _, p in self.named]
        self.flat = FlatLayout(tp_plan.local_shapes(self.param_shapes, self.tp.size if self.tp else 1))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.steps_done = 0
        if cfg.parallel.zero:   # under tp: each tp rank's slices sharded over its dp group
            tp_args = {} if self.tp is None else {"tp": self.tp.coll, "kind": tp_plan.norm_kind}
            self.zero = Zero1(self.flat, self.comm, cfg.optim, cfg.aggregation, **tp_args)
        if cfg.localsgd.every:   # both on torch tensors, through the tensor Collectives
            self.local = LocalSGD(cfg.localsgd, self.comm, self.device_flat_params())
        if self.zero is None:
            self.opt = adamw_state.make_adamw(self.named, cfg.optim)
        if cfg.train.precision == "fp16":   # dp, tp, ZeRO-1, local SGD (config validation)
            self.scaler = LossScaler()


    # backend primitives (hvdllm/engines.py) --------------------------------------------------
    to_host = staticmethod(to_host)
    from_host = staticmethod(from_host)

    @staticmethod
    @torch.no_grad()
    def assign(p, a) -> None:
        p.copy_(from_host(a))

    @staticmethod
    def concat_flat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    @staticmethod
    @torch.no_grad()
    def assign_flat(tensors, flat: torch.Tensor) -> None:
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))

    def optimizer_state(self) -> dict:
        return adamw_state.export(self.opt, self.named)

    def load_optimizer_state(self, state, step: int) -> None:
        adamw_state.load(self.opt, self.named, state)

    @torch.no_grad()
    def last_logits(self, ids) -> np.ndarray:
        self.model.eval()
        logits = self.model.full_logits(self.model(from_host(np.array([ids], dtype=np.int64))))
        return to_host(logits[0, -1].double())

    # training --------------------------------------------------------------------------
    def _forward_backward(self, x, y) -> torch.Tensor:
        """Gradient of the mean loss over all k micro-batches (each contributes loss/k)."""
        self.model.train()
        for p in self.params:
            p.grad = None
        k = self.cfg.aggregation.accumulation
        total = torch.zeros((), device=self.params[0].device)
        scale = self._step_scale()
        for xm, ym in aggregation.split_microbatches(x, y, k):
            loss = self._loss(from_host(xm), from_host(ym)) / k
            (loss if scale == 1.0 else loss * scale).backward()
            total += loss.detach()
        return total

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, its flat gradient) with no communication: for strategies
        that move gradients themselves (parameter servers)."""
        loss = self._forward_backward(x, y)
        return float(loss), self.flat_grads([p.grad for p in self.params])

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        loss = self._forward_backward(x, y)
        self.steps_done += 1
        if self.zero is not None:   # fp16: the scaler's scale, the same on every rank (not an injected one)
            new, norm = self.zero.step(self.concat_flat([p.grad for p in self.params]), self.device_flat_params(), lr,
                                       scale=None if self.scaler is None else self.scaler.scale)
            skip = self.scaler is not None and not math.isfinite(norm)   # the job-wide norm: the same everywhere
            if not skip:
                self.set_device_flat_params(new)
            mean_loss = None
        else:
            norm, mean_loss = self._aggregate_and_clip(loss, reduce=self.local is None)
            # the same on every rank (the reduced norm); local SGD: this rank's own, as it steps alone
            skip = self.scaler is not None and not math.isfinite(float(norm))
            if not skip:
                adamw_state.set_lr(self.opt, lr)
                self.opt.step()
            if self.local is not None and self.local.due(self.steps_done, self.cfg.train.steps):
                self.set_device_flat_params(self.local.sync(self.device_flat_params()))
        if self.scaler is not None:
            self.scaler.update(not skip)
        if mean_loss is None:
            mean_loss = self.comm.allreduce(loss, op="average", name="loss")
        # 0-d tensors, read only when someone looks (the trainer: when it logs): no device sync here
        return StepResult(loss=mean_loss.reshape(()), grad_norm=norm, skipped=self.scaler is not None and skip)

    def _aggregate_and_clip(self, loss: torch.Tensor, reduce: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gradient norm, mean loss over the dp group or None if not reduced here), both still
        tensors: nothing is read back to the host here. On the in-place path the loss rides in
        the gradients' fused message: one Horovod op per step instead of two (a second op costs
        a negotiation cycle)."""
        grads = [p.grad for p in self.params]
        mean_loss = None
        if reduce and self.comm.size > 1 and self.reduce.compression == "none" and self.reduce.op != "adasum":
            r = self.reduce
            mean_loss = loss.detach().reshape(1).clone()
            self.comm.grouped_allreduce_(grads + [mean_loss], op=r.op, name="grads", prescale=r.prescale,
                                         postscale=r.postscale)
            if self.cfg.aggregation.op == "sum":   # (predivide's "sum" is an average already)
                mean_loss /= self.comm.size
        elif reduce and self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, name="grads", **self.reduce.kwargs())
            for p, g in zip(self.params, grads):
                p.grad = g
        if self.tp:
            norm = norm_sq(list(zip(self.flat.names, grads)), self.tp).sqrt().float()
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if self.scaler is not None:   # fp16: the norm of the true gradients, which clipping sees
            norm = norm / self.scale
            torch._foreach_mul_(grads, clip_coef(norm, self.cfg.optim.grad_clip, minimum=_clamp_max) / self.scale)
        elif self.cfg.optim.grad_clip > 0:
            torch._foreach_mul_(grads, clip_coef(norm, self.cfg.optim.grad_clip, minimum=_clamp_max))
        return norm, mean_loss

    # evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        if self.head is not None:   # classify: the logits come back too (hvdllm/engine.py)
            return self.head.evaluate(from_host(x), from_host(y))
        self.model.eval()
        logits = self.model(from_host(x))
        t = from_host(y).reshape(-1)
        loss_sum = self.model.loss_from_logits(logits, t) * t.numel()
        full = self.model.full_logits(logits)
        correct = (full.reshape(-1, full.shape[-1]).argmax(-1) == t).sum()
        return EvalResult(float(loss_sum), int(correct), int(t.numel()))


def _clamp_max(t: torch.Tensor, c: float) -> torch.Tensor:
    return t.clamp(max=c)
