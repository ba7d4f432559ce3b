"""The torch Engine: forward/backward, Horovod gradient aggregation, clipping, AdamW.

Per train_step the messages are, in order: one grouped allreduce of every gradient over the
data-parallel process set (op and wire dtype from cfg.aggregation), then one allreduce of the
scalar loss for logging. Everything else is local arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

from hvdllm import sampling
from hvdllm.engine import EvalResult, StepResult

from .collectives import Collectives
from .model import GPT


def configure(threads: int, seed: int = 0) -> None:
    """Set compute threads before any work (0 = torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(max(1, min(threads, 2)))


class Engine:
    def __init__(self, cfg, layout, collectives: Collectives | None = None):
        self.cfg = cfg
        self.layout = layout
        self.comm = collectives or Collectives()
        torch.manual_seed(cfg.train.seed + layout.rank)  # dropout streams differ per rank
        self.model = GPT(cfg.model, cfg.train.seed)
        self._broadcast_parameters()
        self.params = [p for _, p in self.model.named()]
        o = cfg.optim
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)

    def _broadcast_parameters(self):
        """Rank 0's initial weights win: ranks agree even if their seeds or files differed."""
        if self.comm.size == 1:
            return
        with torch.no_grad():
            for name, p in self.model.named():
                p.copy_(self.comm.broadcast(p.data, root=0, name=f"init.{name}"))

    # training --------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        self.model.train()
        loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
        for p in self.params:
            p.grad = None
        loss.backward()
        grad_norm = self._aggregate_and_clip()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        mean_loss = self.comm.allreduce(loss.detach(), op="average", name="loss")
        return StepResult(loss=float(mean_loss), grad_norm=grad_norm)

    def _aggregate_and_clip(self) -> float:
        a = self.cfg.aggregation
        grads = [p.grad for p in self.params]
        if self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, op=a.op, name="grads", compression=a.compression)
            for p, g in zip(self.params, grads):
                p.grad = g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        return float(norm)

    # evaluation and metrics -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        self.model.eval()
        logits = self.model(torch.from_numpy(x))
        flat = logits.view(-1, logits.shape[-1])
        t = torch.from_numpy(y).reshape(-1)
        loss_sum = torch.nn.functional.cross_entropy(flat, t, reduction="sum")
        correct = (flat.argmax(-1) == t).sum()
        return EvalResult(float(loss_sum), int(correct), int(t.numel()))

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.asarray(values, dtype=np.float64))
        return self.comm.allreduce(t, op="sum", name="metrics").numpy()

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {n: p.detach().numpy().copy() for n, p in self.model.named()}
        step = 0
        for n, p in self.model.named():
            st = self.opt.state.get(p)
            if st:
                out[f"optim.m.{n}"] = st["exp_avg"].numpy().copy()
                out[f"optim.v.{n}"] = st["exp_avg_sq"].numpy().copy()
                step = int(st["step"])
        out["optim.step"] = np.array(step, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        step = int(state.get("optim.step", 0))
        with torch.no_grad():
            for n, p in self.model.named():
                p.copy_(torch.from_numpy(np.asarray(state[n], dtype=np.float32)))
                if step > 0 and f"optim.m.{n}" in state:
                    self.opt.state[p] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": torch.from_numpy(np.array(state[f"optim.m.{n}"], dtype=np.float32)),
                        "exp_avg_sq": torch.from_numpy(np.array(state[f"optim.v.{n}"], dtype=np.float32)),
                    }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0) -> list[int]:
        self.model.eval()

        def last_logits(ids):
            return self.model(torch.tensor([ids], dtype=torch.long))[0, -1].double().numpy()
        return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                 temperature, top_k, seed)
