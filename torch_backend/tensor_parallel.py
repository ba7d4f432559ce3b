"""Tensor-parallel building blocks for torch: the f / g operators of Megatron-LM as autograd
functions, the vocabulary-parallel embedding and cross-entropy. Which parameter splits how is the
core's (hvdllm/strategies/tensor_parallel.py); the collectives go over this rank's tp process set.
"""
from __future__ import annotations

import torch

from .collectives import Collectives


class TPGroup:
    """The tp group's collectives plus a count of allreduces per direction (tests assert 2+2 per
    block, as Megatron-LM does)."""

    def __init__(self, collectives: Collectives):
        self.coll = collectives
        self.size, self.rank = collectives.size, collectives.rank
        self.counts = {"forward": 0, "backward": 0}

    def allreduce(self, t, direction: str, op: str = "sum"):
        self.counts[direction] += 1
        return self.coll.allreduce(t.contiguous(), op=op)


class _Copy(torch.autograd.Function):
    """f: identity forward, allreduce(sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.allreduce(g, "backward"), None


class _Reduce(torch.autograd.Function):
    """g: allreduce(sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return group.allreduce(x, "forward")

    @staticmethod
    def backward(ctx, g):
        return g, None


# train.compile: dynamo cannot trace Horovod's ops (they leave torch for Horovod's background
# thread), so each f / g runs outside the compiled graphs: a graph break at each collective, the
# block's pieces between them compiled. The None checks stay traceable, so without tp a block
# is still one graph.
@torch.compiler.disable
def _copy(x, group: TPGroup):
    return _Copy.apply(x, group)


@torch.compiler.disable
def _reduce(x, group: TPGroup):
    return _Reduce.apply(x, group)


def copy_to_tp(x, group: TPGroup | None):
    return x if group is None else _copy(x, group)


def reduce_from_tp(x, group: TPGroup | None):
    if group is None:
        return x
    # a 16-bit matmul's partial sums (train.precision) are summed in float32: Horovod's CPU ops
    # take no bfloat16, and the sum of tp partial products is where precision is lost
    return _reduce(x.float() if x.dtype in (torch.bfloat16, torch.float16) else x, group)


def vocab_range(vocab: int, group: TPGroup) -> tuple[int, int]:
    n = vocab // group.size
    return group.rank * n, (group.rank + 1) * n


def vocab_parallel_embedding(ids, wte_shard, vocab: int, group: TPGroup):
    """Rows this rank owns are looked up, others are zero; the sum over ranks is the embedding."""
    lo, hi = vocab_range(vocab, group)
    mine = (ids >= lo) & (ids < hi)
    local = wte_shard[(ids - lo).clamp(0, hi - lo - 1)] * mine.unsqueeze(-1)
    return reduce_from_tp(local, group)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy from vocabulary-sharded logits, never gathering them: three allreduces
    of (N,) tensors (max, sum of exponentials, target logit). Backward is local:
    d loss / d logits = (softmax - onehot) / N on each rank's slice."""

    @staticmethod
    def forward(ctx, logits, targets, vocab, group):
        lo, hi = vocab_range(vocab, group)
        logits = logits.float()
        gmax = group.coll.allreduce(logits.max(-1).values, op="max")
        shifted = logits - gmax.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = group.allreduce(exp.sum(-1), "forward")
        mine = (targets >= lo) & (targets < hi)
        idx = (targets - lo).clamp(0, hi - lo - 1)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        target_logit = group.allreduce(target_logit, "forward")
        loss = (sum_exp.log() - target_logit).mean()
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, mine)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, idx, mine = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        return grad * (g / idx.numel()), None, None, None


def vocab_parallel_cross_entropy(logits, targets, vocab: int, group: TPGroup):
    """logits (N, V/tp) this rank's vocabulary slice, targets (N,) global ids -> mean loss."""
    return _VocabParallelCE.apply(logits, targets, vocab, group)


def gather_vocab(logits, group: TPGroup):
    """Full logits (for argmax in evaluation and for sampling): an allgather of the last axis."""
    flat = logits.reshape(-1, logits.shape[-1]).t().contiguous()   # (V/tp, N): gather along rows
    full = group.coll.allgather(flat)                              # (V, N)
    return full.t().reshape(*logits.shape[:-1], -1)


def norm_sq(named_grads, group: TPGroup | None) -> torch.Tensor:
    """Squared global gradient norm of a tp-sharded model: sharded parameters summed over the
    group, replicated ones (identical on every tp rank) counted once."""
    from hvdllm.strategies.tensor_parallel import style
    zero = torch.zeros((), dtype=torch.float64, device=named_grads[0][1].device if named_grads else None)
    sharded = sum(((g.double() ** 2).sum() for n, g in named_grads if style(n) != "replicate"), zero)
    replicated = sum(((g.double() ** 2).sum() for n, g in named_grads if style(n) == "replicate"), zero)
    if group is not None:
        sharded = group.coll.allreduce(sharded.reshape(1), op="sum", name="tp.normsq")[0]
    return sharded + replicated
