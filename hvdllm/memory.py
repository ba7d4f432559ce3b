"""Bytes a training rank holds, predicted from the model config and the layout (framework-free).

What each term counts (fp32 everywhere, as the engines train today; `dtype_bytes` changes the
activations' width, not the master state):

- model state, ZeRO paper (Rajbhandari et al. 2020, section 3) for AdamW with Ψ = the parameters
  this rank's model part holds (after the tp split and the pipeline partition) and N = dp:
      stage 0: params 4Ψ, grads 4Ψ,   optimizer 8Ψ     (m and v; 16Ψ in all)
      stage 1: params 4Ψ, grads 4Ψ,   optimizer 8Ψ/N
      stage 2: params 4Ψ, grads 4Ψ/N, optimizer 8Ψ/N
      stage 3: params 4Ψ/N, grads 4Ψ/N, optimizer 8Ψ/N
  Shards are ceil(Ψ/N) elements, as hvdllm.flat pads the flat vector (Zero1.state_bytes). With
  offload="optimizer" the optimizer term moves to host memory ("host"). Stage 2 and 3 also hold
  "live" full-size units while they work (stage 2: the largest unit's gradient before its
  reduce-scatter; stage 3: the gathered unit, the next one prefetched, and the unit's gradient):
  the unit is a transformer block or the embedding / head. Inside pipeline stages and beside
  tp stage 3 prefetches none, and the two stages holding a tied wte keep that unit's gradient whole over
  the step (summed with the other stage's before its reduce-scatter): one unit more, "live".
  Stage 2 keeps a "master" 4Ψ/N too, the flat copy of its shards AdamW updates beside the
  model's whole parameters.
- activations kept for the backward, per micro-batch of b sequences of s tokens, per layer
  (C = n_embd, F = ffn_hidden, V = the head's rows, t = tp), in
  elements; each is a tensor autograd saves in this repo's models (torch_backend/model.py):
      gpt2 block:  4C (the inputs of ln_1, c_attn, ln_2 and c_fc: replicated over tp)
                   + (5C + 2F) / t (q, k, v, the attention output and c_proj's input; c_fc's
                   output, the GELU input, and the GELU output, mlp.c_proj's input)
      llama block: 4C + (5C + 4F) / t (q after rotary, k and v repeated to every query head
                   (repeat_interleave: grouped-query attention saves no memory here), the attention
                   output and o's input; SwiGLU's gate, silu(gate), up and down's input)
      head:        2C + 2V/t (final norm and head inputs; the log-softmax autograd keeps, and the
                   logits' gradient the backward starts with)
  times s*b*dtype_bytes. Attention is fused (scaled_dot_product_attention keeps no s x s
  matrix), so Korthikanti et al. 2022's 5*a*s^2*b term is 0 here; pass fused_attention=False to
  add its fp32 equivalent 4*a*s^2*b/t bytes per block (softmax output, no dropout mask). Their
  34*s*b*h (16-bit, with dropout masks) counts these tensors too, but the attention output and
  c_proj's input as one and 1-byte masks: here gpt2 at F = 4C keeps 17*C elements per token,
  68*s*b*h bytes in fp32.
  Full activation checkpointing keeps each block's input (C per token) and recomputes one block
  at a time in the backward, so: blocks * C + one block's full set.
- pipeline: the number of micro-batches whose activations a stage holds at once is counted
  from the schedule's own instruction list (strategies/schedules.py): 1F1B: min(p - stage, m);
  GPipe: m; interleaved: Megatron's warm-up depth, in chunks.

- communication and step buffers (each is a buffer the engines allocate; measured per phase on
  real `hvdllm train` ranks, VmHWM reset at each phase's start: see the tests in
  tests/unit/test_memory.py and the note of `hvdllm bench plan`):
      fusion  Horovod's tensor-fusion buffer (horovod/common/fusion_buffer_manager.cc): allocated
              once at HOROVOD_FUSION_THRESHOLD (aggregation.fusion_threshold_mb, default 128 MiB,
              common/operations.cc) and kept; only the pages a fused message writes become
              resident, so it holds min(threshold, the largest message copied into it): at dp > 1
              the grouped gradient allreduce (ZeRO 0, the pipeline's too) or ZeRO-1's padded flat
              gradient (its reduce-scatter copies it in), ZeRO 2/3 one unit's gradient. Resident
              from the first step on, so it adds to the backward's peak.
      step    what the optimizer step allocates after the backward freed the activations:
              ZeRO 0, torch.optim.AdamW(foreach=True) (torch_backend/adamw_state.py, off CUDA):
              _foreach_sqrt(exp_avg_sq), one temporary of 4 bytes per parameter (the fused CUDA
              kernel has none: `fused_adamw`); a pipeline stage at dp > 1 adds the out-of-place
              grouped allreduce's output (PipelineStageBase.reduce_and_step), 4 per parameter;
              ZeRO 1 (torch_backend/engine.py train_step, strategies/zero.py step): the flat
              gradient and flat parameters (concat_flat, device_flat_params), the allgather's
              whole new vector, 12 per parameter, and the reduce-scatter's shard 4/N;
              ZeRO 2 the allgather of every unit's updated shard, 4 per parameter; ZeRO 3
              none (the shards update in place).
  The rank's peak: model state + fusion + max(activations, step): the step's buffers reuse the
  memory the backward freed. Under ZeRO 0/1 the engines free the gradients before each step's
  first forward, so there the gradients move to the second term, (activations, gradients +
  step), unless a backward precedes the activations' peak in the step (accumulation; a
  pipeline schedule that reaches its in-flight peak again after a backward, as 1F1B does).

Not counted: framework workspace and allocator slack (on a CPU, glibc's heap keeps freed blocks
and fragments over the first steps: a few % above these terms), MPI's own temporaries inside a
collective (freed after it), the input batch, and the end-of-run checkpoint's host copies.
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

from . import params
from .strategies import tensor_parallel as tp_plan

FP32 = 4
STATE_KEYS = ("params", "grads", "optimizer")
# Horovod 0.28's HOROVOD_FUSION_THRESHOLD when unset: SetTensorFusionThresholdBytes(128 * 1024 * 1024)
# in horovod/common/operations.cc
HOROVOD_FUSION_BYTES = 128 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _Model:
    """A hashable copy of a model config's sizes, so the planner's thousands of layouts of one
    model compute its shapes and partitions once (lru_cache below)."""
    fields: tuple

    def __getattr__(self, name):
        for k, v in object.__getattribute__(self, "fields"):
            if k == name:
                return v
        raise AttributeError(name)


def _frozen(model_cfg) -> _Model:
    if isinstance(model_cfg, _Model):
        return model_cfg
    items = model_cfg.__dict__ if not dataclasses.is_dataclass(model_cfg) else \
        {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    return _Model(tuple(sorted((k, v) for k, v in items.items() if not k.startswith("_"))))


def _shard(n: int, dp: int) -> int:
    """Elements of one of dp equal shards of the zero-padded flat vector (hvdllm.flat)."""
    return -(-n // dp)


def zero_state_bytes(n_params: int, dp: int, stage: int, offload: str = "none",
                     live_unit: int = 0, prefetch: int = 1) -> dict:
    """Per-rank bytes of parameters, gradients and AdamW state under ZeRO `stage` (0-3) over a dp
    group of `dp`, for `n_params` = Ψ parameters held by this rank's model part. `offload`:
    'none' or 'optimizer' (AdamW state in host memory). `live_unit`: parameters of the largest
    unit (block / embedding) that stage 2/3 materialise whole while working on it; `prefetch`:
    units gathered ahead by stage 3. Returns {"params", "grads", "optimizer", "live", "master"
    (stage 2's flat master shard), "device", "host"} in bytes."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if offload not in ("none", "optimizer"):
        raise ValueError(f"offload must be 'none' or 'optimizer', got {offload!r}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    shard = _shard(n_params, dp)
    p = FP32 * (shard if stage >= 3 else n_params)
    g = FP32 * (shard if stage >= 2 else n_params)
    o = 2 * FP32 * (shard if stage >= 1 else n_params)
    live = 0
    if dp > 1 and stage == 2:
        live = FP32 * live_unit                      # the unit's gradient before reduce-scatter
    elif dp > 1 and stage == 3:
        live = FP32 * live_unit * (2 + prefetch)     # gathered + prefetched params, its gradient
    # stage 2 keeps the whole parameters in the model and, beside them, the flat master copy of
    # this rank's shards that AdamW updates (strategies/zero_sharded.py `self.p`); at stage 3 that
    # shard is the parameters' only copy (counted in p)
    master = FP32 * shard if stage == 2 else 0
    host = o if offload == "optimizer" else 0
    device = p + g + (0 if host else o) + live + master
    return {"params": p, "grads": g, "optimizer": o, "live": live, "master": master, "device": device,
            "host": host}


def fusion_bytes(n_params: int, dp: int, stage: int, unit: int = 0, grad_bytes: int = FP32,
                 threshold: int = HOROVOD_FUSION_BYTES) -> int:
    """Resident bytes of Horovod's fusion buffer on a rank whose model part holds `n_params`
    (module docstring): the largest message copied into it, capped at the threshold. No dp
    reduction, no buffer touched (tp's allreduces are one tensor each: not fused)."""
    if dp <= 1:
        return 0
    message = (unit if stage >= 2 else n_params) * grad_bytes
    return min(message, threshold)


def step_bytes(n_params: int, dp: int, stage: int, pipeline: bool = False, fused_adamw: bool = False) -> int:
    """Bytes the optimizer step allocates on top of the model state (module docstring)."""
    if stage == 0:
        temp = 0 if fused_adamw else FP32 * n_params                 # _foreach_sqrt(exp_avg_sq)
        return temp + (FP32 * n_params if pipeline and dp > 1 else 0)   # grouped_allreduce's output
    if stage == 1:
        return 3 * FP32 * n_params + FP32 * _shard(n_params, dp)    # flat grad, flat params, allgather; shard
    if stage == 2:
        return FP32 * n_params if dp > 1 else 0                     # the allgathered parameters
    return 0


# ---------------------------------------------------------------------------------------------
# Ψ: what one (pipeline stage, tp rank) holds

def stage_layers(model_cfg, pp: int, virtual_stages: int = 1, partition: str = "params") -> list[list[int]]:
    """Layer indices (0 = embeddings, 1..L = blocks, L+1 = head) of every pipeline rank, as the
    engines split them (strategies/pipeline.split_layers; 'time' is measured at start, so its
    prediction uses the parameter counts)."""
    return [sorted(i for c in chunks for i in c) for chunks in stage_chunks(model_cfg, pp, virtual_stages, partition)]


def stage_chunks(model_cfg, pp: int, virtual_stages: int = 1, partition: str = "params") -> list[list[list[int]]]:
    """Per pipeline rank, its chunks' layer lists (one chunk unless interleaved)."""
    return _stage_chunks(_frozen(model_cfg), pp, virtual_stages, partition)


@lru_cache(maxsize=4096)
def _stage_chunks(model_cfg, pp, virtual_stages, partition):
    from .strategies import pipeline as pl
    from .strategies.partition import partition as split
    ranges = split(params.layer_costs(model_cfg), pp * virtual_stages,
                   "uniform" if partition == "uniform" else "params")
    return tuple(tuple(tuple(c) for c in pl.stage_chunks(ranges, pp, virtual_stages, s)) for s in range(pp))


def part_shapes(model_cfg, layers, tp: int = 1) -> dict[str, tuple]:
    """{name: local shape} of the parameters a rank holding `layers` at tp rank 0 keeps (a
    tied `wte` is held by both the first and the last stage)."""
    whole = params.param_shapes(model_cfg)
    names = params.names_for_layers(model_cfg, layers)
    return tp_plan.local_shapes({n: whole[n] for n in names}, tp)


def count_params(model_cfg, layers=None, tp: int = 1) -> int:
    """Ψ: parameters of `layers` (default: all) on one tp rank (a tied wte counted once)."""
    if layers is None:
        return sum(math.prod(s) for s in part_shapes(model_cfg, range(params.n_layers(model_cfg)), tp).values())
    per_layer = layer_param_counts(model_cfg, tp)
    layers = set(layers)
    n = sum(per_layer[i] for i in layers)
    L = model_cfg.n_layer
    if params.tied(model_cfg) and 0 in layers and L + 1 in layers:   # one wte serves both ends
        n -= _table_params(_frozen(model_cfg), tp)
    return n


def tied_unit(model_cfg, layers, pp: int, zero: int, tp: int = 1) -> int:
    """Parameters of the unit whose gradient a ZeRO-2/3 pipeline stage keeps whole over the step
    (strategies/zero_sharded.py ShardedStageBase): the first stage's embeddings and the last
    stage's head, which hold the two copies of a tied wte; 0 elsewhere."""
    if zero < 2 or pp < 2 or not params.tied(model_cfg):
        return 0
    counts, head = layer_param_counts(model_cfg, tp), model_cfg.n_layer + 1
    return sum(counts[i] for i in (0, head) if i in layers and (0 in layers) != (head in layers))


def layer_param_counts(model_cfg, tp: int = 1) -> list[int]:
    """Parameters of each layer on one tp rank (the head counts a tied wte again: the last
    stage holds its copy)."""
    return list(_layer_counts(_frozen(model_cfg), tp))


@lru_cache(maxsize=1024)
def _layer_counts(model_cfg, tp) -> tuple:
    whole = params.param_shapes(model_cfg)
    local = tp_plan.local_shapes(whole, tp)
    return tuple(sum(math.prod(local[n]) for n in params.layer_params(model_cfg, i))
                 for i in range(params.n_layers(model_cfg)))


@lru_cache(maxsize=1024)
def _table_params(model_cfg, tp) -> int:
    return math.prod(tp_plan.local_shapes({"wte": params.param_shapes(model_cfg)["wte"]}, tp)["wte"])


# ---------------------------------------------------------------------------------------------
# activations

def block_activation_elems(model_cfg, tp: int = 1, fused_attention: bool = True) -> float:
    """Elements one block keeps for its backward, per token (see the module docstring)."""
    C, F = model_cfg.n_embd, params.ffn_hidden(model_cfg)
    if params.is_llama(model_cfg):
        split = 5 * C + 4 * F
    else:
        split = 5 * C + 2 * F
    elems = 4 * C + split / tp
    if not fused_attention:
        elems += model_cfg.n_head * model_cfg.block_size / tp    # a*s per token: the s x s softmax
    return elems


def head_activation_elems(model_cfg, tp: int = 1) -> float:
    """Elements the head (final norm, logits, log-softmax) keeps per token."""
    rows = _head_rows(_frozen(model_cfg))
    return 2 * model_cfg.n_embd + 2 * rows / tp


@lru_cache(maxsize=1024)
def _head_rows(model_cfg) -> int:
    return params.param_shapes(model_cfg)[params.head_name(model_cfg)][0]


def layers_activation_bytes(model_cfg, layers, tokens: int, tp: int = 1, checkpointing: str = "none",
                            dtype_bytes: int = FP32, fused_attention: bool = True) -> int:
    """Activation bytes of one micro-batch of `tokens` tokens through `layers`."""
    L = model_cfg.n_layer
    blocks = sum(1 for i in layers if 1 <= i <= L)
    block = block_activation_elems(model_cfg, tp, fused_attention)
    if checkpointing == "none" or blocks == 0:
        elems = blocks * block
    elif checkpointing == "full":
        elems = blocks * model_cfg.n_embd + block   # block inputs, and one block recomputed
    else:
        raise ValueError(f"checkpointing must be 'none' or 'full', got {checkpointing!r}")
    if L + 1 in layers:
        elems += head_activation_elems(model_cfg, tp)
    return int(elems * tokens * dtype_bytes)


@lru_cache(maxsize=8192)
def inflight(schedule: str, p: int, m: int, stage: int, v: int = 1) -> int:
    """Peak (micro-batch, chunk) activations a pipeline stage holds, counted on the schedule's
    instruction list (a forward adds one, its backward frees it)."""
    if p == 1:
        return 1
    from .strategies import schedules
    live = peak = 0
    for ins in schedules.build(schedule, p, m, stage, v):
        if ins.op == "forward":
            live += 1
            peak = max(peak, live)
        elif ins.op == "backward":
            live -= 1
    return peak


@lru_cache(maxsize=8192)
def grads_at_peak(schedule: str, p: int, m: int, stage: int, v: int = 1) -> bool:
    """Whether a pipeline stage holds its peak of in-flight activations again after a backward
    of the same step (1F1B's steady state does; GPipe's all-forward phase does not): the
    step's gradients then exist beside them."""
    if p == 1:
        return False
    from .strategies import schedules
    peak = inflight(schedule, p, m, stage, v)
    live, backward = 0, False
    for ins in schedules.build(schedule, p, m, stage, v):
        if ins.op == "forward":
            live += 1
            if live == peak and backward:
                return True
        elif ins.op == "backward":
            live -= 1
            backward = True
    return False


# ---------------------------------------------------------------------------------------------
# one rank, under a layout

def rank_memory(cfg, dp: int, *, checkpointing: str | None = None, offload: str | None = None,
                dtype_bytes: int = FP32, fused_attention: bool = True, fused_adamw: bool = False) -> dict:
    """Predicted bytes per rank for cfg (its model, train.batch_size, parallel.pp / tp / zero /
    microbatches / schedule / virtual_stages / partition, aggregation.fusion_threshold_mb /
    compression) at data-parallel size `dp`. The checkpointing and offload settings default to
    the config's (train.activation_checkpointing, parallel.offload) where those exist, else
    'none'; `fused_adamw`: torch's AdamW runs its fused kernel (CUDA: no step temporary).
    Returns the worst pipeline stage's {"params", "grads", "optimizer", "live", "fusion",
    "step", "activations", "device", "host", "psi", "stage", "inflight"} and "stages": the same
    for every stage."""
    m, par = cfg.model, cfg.parallel
    pp, tp, zero = par.pp, par.tp, par.zero
    ckpt = checkpointing or getattr(cfg.train, "activation_checkpointing", "none")
    # 'selective' recomputes only the attention core, which fused attention keeps little of:
    # counted as 'none' (an upper bound)
    ckpt = ckpt if ckpt in ("none", "full") else "none"
    off = offload or getattr(par, "offload", "none")
    v = par.virtual_stages if par.schedule == "interleaved" else 1
    micro = par.microbatches if pp > 1 else 1
    accumulation = getattr(getattr(cfg, "aggregation", None), "accumulation", 1) or 1
    tokens = (cfg.train.batch_size // micro) * m.block_size
    agg = getattr(cfg, "aggregation", None)
    mb = getattr(agg, "fusion_threshold_mb", 0) or 0
    threshold = int(mb * 1024 * 1024) if mb > 0 else HOROVOD_FUSION_BYTES
    wire = 2 if getattr(agg, "compression", "none") in ("fp16", "bf16") else FP32
    stages = []
    for s, chunks in enumerate(stage_chunks(m, pp, v, par.partition)):
        layers = [i for c in chunks for i in c]
        psi = count_params(m, layers, tp)
        unit = max(layer_param_counts(m, tp)[i] for i in layers)
        # ZeRO-3 gathers no unit ahead inside pipeline stages (ZeroSharded.stage_forward says why)
        # nor beside tp (torch_backend/sharded.py)
        state = zero_state_bytes(psi, dp, zero, off, live_unit=unit, prefetch=0 if pp > 1 or tp > 1 else 1)
        tied = tied_unit(m, layers, pp, zero, tp)
        if tied:   # ZeRO-2/3 stage holding the tied wte: that unit's gradient whole over the step
            state = {**state, "live": state["live"] + FP32 * tied, "device": state["device"] + FP32 * tied}
        chunk_act = max(layers_activation_bytes(m, c, tokens, tp, ckpt, dtype_bytes, fused_attention)
                        for c in chunks)
        held = inflight(par.schedule, pp, micro, s, v)
        act = chunk_act * held
        fusion = fusion_bytes(psi, dp, zero, unit, wire, threshold)
        step = step_bytes(psi, dp, zero, pp > 1, fused_adamw)
        # ZeRO 0/1 free the whole gradients before each step's first forward (p.grad = None): at
        # the activations' peak they exist only if a backward ran before it in the same step
        # (accumulation, or a pipeline schedule that reaches its peak again after a backward)
        grads_held = (pp > 1 and grads_at_peak(par.schedule, pp, micro, s, v)) or (pp == 1 and accumulation > 1)
        transient = state["grads"] if zero <= 1 and not grads_held else 0
        device = state["device"] - transient + fusion + max(act, transient + step)
        stages.append({**state, "fusion": fusion, "step": step, "activations": act, "device": device, "psi": psi,
                       "stage": s, "inflight": held, "checkpointing": ckpt, "offload": off, "layers": layers})
    worst = max(stages, key=lambda r: r["device"])
    return {**worst, "stages": stages}
