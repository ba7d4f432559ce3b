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
import torch.nn.functional as F

from hvdllm import aggregation, sampling
from hvdllm.engine import EvalResult, StepResult
from hvdllm.strategies import tensor_parallel as tp_plan
from hvdllm.strategies import pipeline as pl
from mpi.groups import subcomms

from . import adamw_state
from .collectives import Collectives, NumpyCollectives
from .model import GPT
from .tensor_parallel import gather_full, norm_sq


def measure_layer_times(model_cfg, seed: int, batch: int) -> list[float]:
    """Forward+backward seconds per layer on this process (for parallel.partition='time')."""
    model = GPT(model_cfg, seed)
    x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size))
    times = []
    for i in model.layers:
        inp = x if i == 0 else torch.randn(batch, model_cfg.block_size, model_cfg.n_embd, requires_grad=True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            model.run_layer(i, inp).float().pow(2).mean().backward()
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


class PipelineEngine:
    def __init__(self, cfg, layout, rt, tp=None):
        rt.require_mpi("pipeline parallelism (parallel.pp > 1)")
        self.cfg, self.layout, self.m = cfg, layout, cfg.parallel.microbatches
        par = cfg.parallel
        p, v, stage = layout.pp, par.virtual_stages, layout.pp_rank
        # collective over COMM_WORLD: role ranks join it in strategies/roles.join_trainer_startup
        self.pp_comm = subcomms(rt.comm, layout, "pp")
        self.timeout = cfg.train.step_timeout
        self.ranges = pl.split_layers(cfg, rt, p * v, measure_layer_times)
        self.chunks = pl.stage_chunks(self.ranges, p, v, stage)
        torch.manual_seed(cfg.train.seed + layout.rank)
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.model = GPT(cfg.model, cfg.train.seed, layers=sorted(i for c in self.chunks for i in c), tp=self.tp)
        self.named = self.model.named()
        self.comm = Collectives(rt.process_set(layout.group("dp")))
        self.reduce = aggregation.reduce_args(cfg.aggregation, self.comm.size)
        self.pipe = pl.Pipeline(self.pp_comm, p, stage, self.m, v, par.schedule, self.timeout)
        self.tied_peer = pl.tied_peer(p, self.model.layers, cfg.model.n_layer)
        self.saved = {}
        self.zero = pl.make_zero(cfg, self, NumpyCollectives) if par.zero else None
        self.opt = adamw_state.make_adamw(self.named, cfg.optim) if self.zero is None else None

    # StageRunner --------------------------------------------------------------------------
    def forward(self, chunk, mb, inp, target):
        layers = self.chunks[chunk]
        x = torch.from_numpy(inp)
        if layers[0] != 0:
            x.requires_grad_(True)
        out = self.model.run_layers(layers, x)
        if target is None:
            self.saved[(mb, chunk)] = (x, out)
            return out.detach().numpy()
        loss = self.model.loss_from_logits(out, torch.from_numpy(target))
        self.saved[(mb, chunk)] = (x, loss / self.m)
        return float(loss.detach())

    def backward(self, chunk, mb, grad):
        x, out = self.saved.pop((mb, chunk))
        out.backward(None if grad is None else torch.from_numpy(grad))
        return x.grad.numpy() if x.requires_grad else None

    # one optimizer step ---------------------------------------------------------------------
    def train_step(self, x, y, lr) -> StepResult:
        self.model.train()
        for _, p in self.named:
            p.grad = None
        norm = []
        loss = self.pipe.run(self, np.split(x, self.m), np.split(y, self.m),
                             lambda: norm.append(self._reduce_and_step(lr)))
        return StepResult(loss=self._dp_mean(loss), grad_norm=norm[0])

    def _reduce_and_step(self, lr) -> float:
        self._sum_tied_embedding()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.named]
        if self.zero is not None:   # reduce-scatter, this rank's AdamW shard, allgather
            new, norm = self.zero.step(self.flat.flatten([g.numpy() for g in grads]),
                                       self.flat.flatten([p.detach().numpy() for _, p in self.named]), lr)
            with torch.no_grad():
                for (_, p), a in zip(self.named, self.flat.unflatten(new).values()):
                    p.copy_(torch.from_numpy(a))
            return norm
        if self.comm.size > 1:
            grads = self.comm.grouped_allreduce(grads, name="pp.grads", **self.reduce.kwargs())
        for (_, p), g in zip(self.named, grads):
            p.grad = g
        # wte is held twice (first and last stage); count it once in the global norm.
        mine = [(n, g) for (n, _), g in zip(self.named, grads) if not (n == "wte" and self.tied_peer == 0)]
        norm = float(np.sqrt(pl.allreduce_sum(self.pp_comm, float(norm_sq(mine, self.tp)), self.timeout,
                                              "pipeline grad-norm allreduce")))
        coef = min(1.0, self.cfg.optim.grad_clip / (norm + 1e-6)) if self.cfg.optim.grad_clip > 0 else 1.0
        torch._foreach_mul_(grads, coef)
        adamw_state.set_lr(self.opt, lr)
        self.opt.step()
        return norm

    def _sum_tied_embedding(self):
        if self.tied_peer is None:
            return
        wte = self.model.p("wte")
        mine = (wte.grad if wte.grad is not None else torch.zeros_like(wte)).numpy()
        wte.grad = torch.from_numpy(pl.sum_with_peer(self.pp_comm, self.tied_peer, mine, self.timeout))

    def _dp_mean(self, value: float) -> float:
        return float(self.comm.allreduce(torch.tensor([value], dtype=torch.float64), op="average", name="pp.loss"))

    # evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x, y) -> EvalResult:
        self.model.eval()
        out = self.pipe.forward_only(lambda c, a: self.model.run_layers(self.chunks[c], torch.from_numpy(a)).numpy(), x)
        res = np.zeros(3)
        if out is not None:
            logits, t = torch.from_numpy(out), torch.from_numpy(y).reshape(-1)
            full = self.model.full_logits(logits).reshape(-1, self.cfg.model.vocab_size)
            res[:] = (float(self.model.loss_from_logits(logits, t)) * t.numel(), int((full.argmax(-1) == t).sum()),
                      t.numel())
        res = pl.bcast_from_last(self.pipe, res)
        return EvalResult(float(res[0]), int(res[1]), int(res[2]))

    def allreduce_sum(self, values):
        t = torch.from_numpy(np.asarray(values, dtype=np.float64))
        return self.comm.allreduce(t, op="sum", name="pp.metrics").numpy()

    # state: gathered over the pipeline so a checkpoint is the whole, unsharded model ---------
    def _local_state(self) -> dict:
        out = {n: p.detach().numpy().copy() for n, p in self.named}
        if self.zero is not None:   # collective over the dp group
            out.update(pl.zero_moments(self.zero, self.flat))
        else:
            out.update(adamw_state.export(self.opt, self.named))
        return out

    def state_dict(self) -> dict:
        """The whole model on pipeline rank 0 (gathered over tp and pp; collective)."""
        local = gather_full(self._local_state(), self.tp)
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.layout.pp, local, self.timeout)

    def shard_state(self) -> tuple[dict, dict]:
        """This stage's (tp slice of its) parameters and moments, and their placements; under
        ZeRO-1 each dp rank's range of the moments (nothing gathered)."""
        if self.zero is not None:
            params = {n: p.detach().numpy().copy() for n, p in self.named}
            return self.zero.shard_state(params, tp_plan.placements(params, self.tp.size, self.tp.rank)
                                         if self.tp else None)
        local = self._local_state()
        return local, (tp_plan.placements(local, self.tp.size, self.tp.rank) if self.tp else {})

    def load_state_dict(self, state: dict) -> None:
        # only this stage's arrays (a sharded checkpoint reads just those)
        names = [n for n, _ in self.named]
        keys = [*names, *(f"optim.{mv}.{n}" for mv in "mv" for n in names), "optim.step"]
        state = tp_plan.shard_state(state, self.tp.size if self.tp else 1, self.tp.rank if self.tp else 0, keys=keys)
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(torch.from_numpy(np.asarray(state[n], np.float32)))
        if self.zero is None:
            adamw_state.load(self.opt, self.named, state)
        elif int(state.get("optim.step", 0)) and f"optim.m.{self.named[0][0]}" in state:
            self.zero.load_shard(state, int(state["optim.step"]))

    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def generate(self, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=0):
        """Every stage calls it: the whole model is gathered to pipeline rank 0, which samples;
        other stages return []."""
        state = self.state_dict()
        if self.layout.pp_rank != 0:
            return []
        full = GPT(self.cfg.model, self.cfg.train.seed).eval()
        with torch.no_grad():
            for n, p in full.named():
                p.copy_(torch.from_numpy(np.asarray(state[n], np.float32)))

            def last_logits(ids):
                return full(torch.from_numpy(np.array([ids], dtype=np.int64)))[0, -1].double().numpy()
            return sampling.generate(last_logits, prompt, max_new_tokens, self.cfg.model.block_size,
                                     temperature, top_k, seed)

    def full_params(self) -> dict:
        """The whole parameters, without optimizer state, on pipeline rank 0 (other stages get
        their own back): tp slices gathered, then every stage's arrays sent to the first.
        Collective over this rank's tp group and pipeline. For the snapshots that trainers send
        to evaluators and generators (hvdllm/strategies/roles.py)."""
        local = gather_full({n: p.detach().numpy() for n, p in self.named}, self.tp)
        return pl.gather_to_first(self.pp_comm, self.layout.pp_rank, self.layout.pp, local, self.timeout)
