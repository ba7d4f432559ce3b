"""The torch Engine: forward/backward, gradient aggregation, clipping and the optimizer step.

Which messages a step sends depends on the strategy (each documented in its core file):
- data parallel (default): one grouped allreduce of every gradient over the dp process set;
- ZeRO-1 (parallel.zero=1): hvdllm/strategies/zero.py (reducescatter, norm allreduce, allgather);
- local SGD (localsgd.every=H): no gradient messages; every H steps hvdllm/strategies/local_sgd.py.
Then one allreduce of the scalar loss, for logging.
"""
from __future__ import annotations

import numpy as np
import torch

from hvdllm import aggregation, sampling
from hvdllm.engine import EvalResult, StepResult
from hvdllm.flat import FlatLayout
from hvdllm.params import param_shapes
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies.local_sgd import LocalSGD
from hvdllm.strategies.zero import Zero1

from . import adamw_state
from .collectives import Collectives, NumpyCollectives
from .tensor_parallel import TPGroup, gather_full, norm_sq
from .model import GPT


def configure(threads: int, seed: int = 0) -> None:
    """Set compute threads before any work (0 = torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(max(1, min(threads, 2)))
        except RuntimeError:  # already set once in this process
            pass


class Engine:
    def __init__(self, cfg, layout, collectives: Collectives | None = None, tp: TPGroup | None = None):
        self.cfg = cfg
        self.layout = layout
        self.comm = collectives or Collectives()
        self.ncomm = NumpyCollectives(self.comm)
        self.tp = tp if tp is not None and tp.size > 1 else None
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.model = GPT(cfg.model, cfg.train.seed, tp=self.tp)
        self._broadcast_parameters()
        self.params = [p for _, p in self.model.named()]
        m = cfg.model
        self.flat = FlatLayout(tp_plan.local_shapes(param_shapes(m.n_layer, m.n_embd, m.vocab_size, m.block_size),
                                                    self.tp.size if self.tp else 1))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.steps_done = 0
        self.zero = None
        if cfg.parallel.zero:   # under tp: each tp rank's slices sharded over its dp group
            tp_args = {} if self.tp is None else {"tp": NumpyCollectives(self.tp.coll), "kind": tp_plan.norm_kind}
            self.zero = Zero1(self.flat, self.ncomm, cfg.optim, cfg.aggregation, **tp_args)
        self.local = LocalSGD(cfg.localsgd, self.ncomm, self.flat_params()) if cfg.localsgd.every else None
        if self.zero is None:
            self.opt = adamw_state.make_adamw(self.model.named(), cfg.optim)

    def _broadcast_parameters(self):
        """Rank 0's initial weights win: ranks agree even if their seeds or files differed."""
        if self.comm.size == 1:
            return
        with torch.no_grad():
            for name, p in self.model.named():
                p.copy_(self.comm.broadcast(p.data, root=0, name=f"init.{name}"))

    # flat views for the core's strategies ------------------------------------------------------
    def flat_params(self) -> np.ndarray:
        return self.flat.flatten([p.detach().numpy() for p in self.params])

    def set_flat_params(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            for p, (name, a) in zip(self.params, self.flat.unflatten(flat).items()):
                p.copy_(torch.from_numpy(a))

    # training --------------------------------------------------------------------------
    def _forward_backward(self, x, y) -> torch.Tensor:
        """Gradient of the mean loss over all k micro-batches (each contributes loss/k)."""
        self.model.train()
        for p in self.params:
            p.grad = None
        k = self.cfg.aggregation.accumulation
        total = torch.zeros(())
        for xm, ym in aggregation.split_microbatches(x, y, k):
            loss = self.model.loss(torch.from_numpy(xm), torch.from_numpy(ym)) / k
            loss.backward()
            total += loss.detach()
        return total

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, its flat gradient) with no communication: for strategies
        that move gradients themselves (parameter servers)."""
        loss = self._forward_backward(x, y)
        return float(loss), self.flat.flatten([p.grad.numpy() for p in self.params])

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        loss = self._forward_backward(x, y)
        self.steps_done += 1
        if self.zero is not None:
            grads = self.flat.flatten([p.grad.numpy() for p in self.params])
            new, norm = self.zero.step(grads, self.flat_params(), lr)
            self.set_flat_params(new)
            mean_loss = None
        else:
            norm, mean_loss = self._aggregate_and_clip(loss, reduce=self.local is None)
            adamw_state.set_lr(self.opt, lr)
            self.opt.step()
            if self.local is not None and self.local.due(self.steps_done, self.cfg.train.steps):
                self.set_flat_params(self.local.sync(self.flat_params()))
        if mean_loss is None:
            mean_loss = self.comm.allreduce(loss, op="average", name="loss")
        return StepResult(loss=float(mean_loss), grad_norm=norm)

    def _aggregate_and_clip(self, loss: torch.Tensor, reduce: bool) -> tuple[float, torch.Tensor | None]:
        """(gradient norm, mean loss over the dp group or None if not reduced here). On the
        in-place path the loss rides in the gradients' fused message: one Horovod op per step
        instead of two (a second op costs a negotiation cycle: ~1 ms, 10-20% of a tiny model's step)."""
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
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        return float(norm), mean_loss

    # evaluation and metrics -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        self.model.eval()
        logits = self.model(torch.from_numpy(x))
        t = torch.from_numpy(y).reshape(-1)
        loss_sum = self.model.loss_from_logits(logits, t) * t.numel()
        full = self.model.full_logits(logits)
        correct = (full.reshape(-1, full.shape[-1]).argmax(-1) == t).sum()
        return EvalResult(float(loss_sum), int(correct), int(t.numel()))

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self.ncomm.allreduce(np.asarray(values, dtype=np.float64), op="sum", name="metrics")

    def optimizer_state_bytes(self) -> int:
        if self.zero is not None:
            return self.zero.state_bytes()
        return sum(t.nbytes for st in self.opt.state.values() for k, t in st.items() if k != "step")

    # state (state_dict is collective under ZeRO-1: every rank calls it) ----------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Whole (unsharded) parameters and AdamW moments: loadable under any layout."""
        return gather_full(self._local_state(), self.tp)

    def shard_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """This rank's part of a sharded checkpoint (collective under ZeRO-1): its tp slices
        and where each sits in the whole array (checkpoint.py, placement.py). Under ZeRO-1 each
        dp rank returns the part of the moments it holds (nothing is gathered)."""
        if self.zero is not None:
            params = {n: p.detach().numpy().copy() for n, p in self.model.named()}
            return self.zero.shard_state(params, tp_plan.placements(params, self.tp.size, self.tp.rank)
                                         if self.tp else None)
        local = self._local_state()
        return local, (tp_plan.placements(local, self.tp.size, self.tp.rank) if self.tp else {})

    def _local_state(self) -> dict[str, np.ndarray]:
        out = {n: p.detach().numpy().copy() for n, p in self.model.named()}
        if self.zero is not None:
            st = self.zero.gather_state()
            m, v = self.flat.unflatten(st["m"]), self.flat.unflatten(st["v"])
            for n in m:
                out[f"optim.m.{n}"], out[f"optim.v.{n}"] = m[n].copy(), v[n].copy()
            out["optim.step"] = np.array(st["t"], dtype=np.int64)
        else:
            out.update(adamw_state.export(self.opt, self.model.named()))
        if self.local is not None:
            out.update(self.local.state())
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.tp:  # take this rank's slices of the whole arrays
            state = tp_plan.shard_state(state, self.tp.size, self.tp.rank)
        step = int(state.get("optim.step", 0))
        self.set_flat_params(self.flat.flatten({n: state[n] for n in self.flat.names}))
        self.steps_done = step
        if step == 0 or f"optim.m.{self.flat.names[0]}" not in state:
            return
        if self.zero is not None:
            self.zero.load_shard(state, step)
        else:
            adamw_state.load(self.opt, self.model.named(), state)
        if self.local is not None:
            self.local.load(state)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0) -> list[int]:
        self.model.eval()

        def last_logits(ids):
            logits = self.model.full_logits(self.model(torch.from_numpy(np.array([ids], dtype=np.int64))))
            return logits[0, -1].double().numpy()
        return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole (unsharded) parameters, without optimizer state: tensor-parallel slices are
        gathered (collective over the tp group: each of its ranks calls this). For the snapshots
        that trainers send to evaluators and generators (hvdllm/strategies/roles.py)."""
        return gather_full({n: p.detach().numpy() for n, p in self.model.named()}, self.tp)


def make_engine(cfg, layout, rt):
    """The engine for this layout: a pipeline stage when parallel.pp > 1, else data parallel."""
    if cfg.model.layers:  # a user's layer list (hvdllm/user_model.py)
        from .sequential import SequentialEngine
        return SequentialEngine(cfg, layout, rt)
    tp = TPGroup(Collectives(rt.process_set(layout.group("tp")))) if layout.tp > 1 else None
    if layout.pp > 1:
        from .pipeline import PipelineEngine
        return PipelineEngine(cfg, layout, rt, tp)
    return Engine(cfg, layout, Collectives(rt.process_set(layout.group("dp"))), tp)
