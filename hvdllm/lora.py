"""LoRA (finetune.lora_rank = r > 0): low-rank adapters on the blocks' linear weights, the base
frozen, framework-neutral. The backends' twins (torch_backend/lora.py, tf_backend/lora.py) apply
exactly what is written here.

For each targeted weight W (hvdllm's (in, out) layout, applied as x @ W), two adapters:
  A  `<module>.lora_A`  (r, in)   Kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default,
                                  torch's kaiming_uniform_ with a = sqrt(5)), drawn from the
                                  run's seed in canonical order
  B  `<module>.lora_B`  (out, r)  zeros, so the model starts as the base model
and the forward uses W + s * (B A)^T = W + s * A^T B^T with s = lora_alpha / r: (B A) is the
(out, in) update of PEFT's nn.Linear layout, transposed into hvdllm's. Merging (`merge`) writes
that sum once, giving a plain model with the same outputs.

What trains, is reduced over the dp group, lives in the optimizer and is checkpointed: the
adapters, plus a classifier's head (task.kind = 'classify': it is new, so it trains). Every other
parameter is frozen and comes from train.init_from at every start, a resume included: a
checkpoint holds only the trainable set, and its run's config.toml (train.init_from) says
where the base is.

Layouts: data parallelism and ZeRO-1 (both work on the trainable set's flat vector, nothing
else changes); ZeRO-2/3 (strategies/zero_sharded.units_for): each unit's adapters (and the
classifier's head in the last unit) are its only parameters there, reduce-scattered, sharded
and stepped, gathered per unit at stage 3; the frozen base stays whole on every rank at both
stages (no gradient or optimizer state of its own to shard; gathering it per unit would cost
1.5x its bytes per micro-batch). Refused by validation: tensor and pipeline parallelism, local
SGD, parameter servers, role ranks and user layer lists (each would need the frozen split there too).

finetune.lora_dropout = p (PEFT's lora_dropout): in training the adapters read a dropped-out copy
of the layer's input, y = x @ W + s * (dropout_p(x) @ A^T) @ B^T, which cannot be folded into one
weight (each token's input has its own mask), so p > 0 runs that unfolded path: two thin matmuls
beside the frozen one. p = 0, and evaluation, generation, predict and `convert --merge-lora` at any
p, use the folded W + s * A^T B^T, the same function without dropout, one matmul. The masks come
from the generator the model's own dropout uses (seeded train.seed + rank, so they differ per dp
rank): torch's global one, TensorFlow's GPT._rng, whose state the TF ZeRO-3 recompute restores so
the backward sees the forward's masks.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np

from . import params, task

DEFAULT_TARGETS = {"gpt2": ["attn.c_attn"], "llama": ["attn.q", "attn.v"]}


def enabled(cfg) -> bool:
    return getattr(getattr(cfg, "finetune", None), "lora_rank", 0) > 0


def scale(cfg) -> float:
    f = cfg.finetune
    return float(f.lora_alpha) / f.lora_rank


def dropout(cfg) -> float:
    """finetune.lora_dropout: the adapters' input dropout in training (0 = the folded forward)."""
    return float(getattr(cfg.finetune, "lora_dropout", 0.0))


def patterns(cfg) -> list[str]:
    return list(cfg.finetune.lora_targets) or DEFAULT_TARGETS[params.family(cfg.model)]


def candidates(model_cfg) -> list[str]:
    """The weights an adapter may sit on: the blocks' linear (2-D) weights."""
    return [n for n, s in params.param_shapes(model_cfg).items()
            if n.startswith("h.") and n.endswith(".weight") and len(s) == 2]


def _matches(name: str, pattern: str) -> bool:
    """'attn.c_attn' matches h.{i}.attn.c_attn.weight; a full name or glob matches itself."""
    module = name[:-len(".weight")]
    return fnmatchcase(name, pattern) or fnmatchcase(module, pattern) or fnmatchcase(module, "*." + pattern)


def targets(cfg) -> list[str]:
    """The targeted weights, in canonical order."""
    pats = patterns(cfg)
    return [n for n in candidates(cfg.model) if any(_matches(n, p) for p in pats)]


def a_name(weight: str) -> str:
    return weight[:-len("weight")] + "lora_A"


def b_name(weight: str) -> str:
    return weight[:-len("weight")] + "lora_B"


def adapter_shapes(cfg) -> dict[str, tuple]:
    r, shapes = cfg.finetune.lora_rank, params.param_shapes(cfg.model)
    out = {}
    for w in targets(cfg):
        d_in, d_out = shapes[w]
        out[a_name(w)], out[b_name(w)] = (r, d_in), (d_out, r)
    return out


def trainable_shapes(cfg) -> dict[str, tuple]:
    """{name: shape} of what trains: the adapters, then a classifier's head."""
    out = adapter_shapes(cfg)
    if task.is_classify(cfg):
        shapes = params.param_shapes(task.model_config(cfg))
        out.update({n: shapes[n] for n in task.HEAD})
    return out


def units(cfg, uses) -> list[list[str]]:
    """ZeRO-2/3's units under LoRA (strategies/zero_sharded.units_for): for each unit's `uses`
    (the model's names it reads), what of it trains: the adapters of its targeted weights, a
    classifier's head. Each unit owns its own (no adapter is read by two units)."""
    tg = set(targets(cfg))
    head = set(task.HEAD) if task.is_classify(cfg) else set()
    return [[m for n in names if n in tg for m in (a_name(n), b_name(n))] + [n for n in names if n in head]
            for names in uses]


def init_adapters(cfg) -> dict[str, np.ndarray]:
    """The adapters' seeded initial values (the same in both frameworks); a generator of their
    own, so the base's and the head's draws (hvdllm.params) do not move."""
    rng = np.random.default_rng([cfg.train.seed, 0x10BA])
    out = {}
    for name, shape in adapter_shapes(cfg).items():
        if name.endswith("lora_A"):
            bound = 1.0 / np.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def delta(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """s * (B A)^T: the (in, out) update a weight gets, in float64 then float32."""
    return (s * (np.asarray(a, np.float64).T @ np.asarray(b, np.float64).T)).astype(np.float32)


def merge(base, trained, cfg) -> dict[str, np.ndarray]:
    """A plain model's parameters: `base` (train.init_from's weights) with the adapters of
    `trained` (a LoRA run's state) folded in and its head, if any, in place."""
    s = scale(cfg)
    shapes = params.param_shapes(task.model_config(cfg))
    out = {}
    for n in shapes:
        w = np.asarray(trained[n] if n in trained else base[n], np.float32)
        if a_name(n) in trained:
            w = w + delta(trained[a_name(n)], trained[b_name(n)], s)
        out[n] = w
    return out


def problems(cfg) -> list[str]:
    """finetune.lora_* rules (config.validate)."""
    f, p = cfg.finetune, []
    if not isinstance(f.lora_rank, int) or f.lora_rank < 0:
        return [f"finetune.lora_rank: must be an integer >= 0 (0 = off), got {f.lora_rank!r}"]
    if not isinstance(f.lora_dropout, (int, float)) or not 0.0 <= f.lora_dropout < 1.0:
        p.append(f"finetune.lora_dropout: must be in [0, 1) (0 = none), got {f.lora_dropout!r}")
    if not enabled(cfg):
        if not p and f.lora_dropout:
            p.append(f"finetune.lora_dropout: {f.lora_dropout} applies to LoRA's adapters, and "
                     "finetune.lora_rank = 0 has none; set finetune.lora_rank > 0 or lora_dropout = 0")
        return p
    if not f.lora_alpha > 0:
        p.append(f"finetune.lora_alpha: must be > 0, got {f.lora_alpha}")
    bad = [t for t in f.lora_targets if not isinstance(t, str) or not t]
    if bad:
        p.append(f"finetune.lora_targets: patterns must be non-empty strings, got {bad[0]!r}")
    elif params.family(cfg.model) in DEFAULT_TARGETS:
        names = candidates(cfg.model)
        idle = [t for t in patterns(cfg) if not any(_matches(n, t) for n in names)]
        if idle:
            some = ", ".join(sorted({n.split(".", 2)[2][:-len(".weight")] for n in names}))
            p.append(f"finetune.lora_targets: {', '.join(map(repr, idle))} match no linear weight; the "
                     f"blocks' are h.<i>.<module>.weight with module one of {some} (e.g. 'attn.c_attn', "
                     f"'mlp.*', 'h.0.{names[0].split('.', 2)[2][:-len('.weight')]}')")
        else:
            shapes = params.param_shapes(cfg.model)
            small = [n for n in targets(cfg) if f.lora_rank > min(shapes[n])]
            if small:
                p.append(f"finetune.lora_rank: {f.lora_rank} exceeds the smaller side of {small[0]} "
                         f"{shapes[small[0]]}; a rank that high is no longer low-rank")
    if not cfg.train.init_from:
        p.append("train.init_from: LoRA adapts a trained model: name the base (an hvdllm run or a Hugging "
                 "Face folder), which stays frozen and is read at every start, a resume included")
    par = cfg.parallel
    refused = [("parallel.tp", par.tp != 1), ("parallel.pp", par.pp != 1), ("localsgd.every", cfg.localsgd.every),
               ("ps.servers", cfg.ps.servers), ("roles.evaluators", cfg.roles.evaluators),
               ("roles.generators", cfg.roles.generators), ("model.layers", cfg.model.layers)]
    for key, bad in refused:
        if bad:
            p.append(f"{key}: not combinable with finetune.lora_rank > 0 yet (LoRA runs under data "
                     f"parallelism and parallel.zero = 1, 2 or 3: the frozen base would need tp / pp's split "
                     f"and the adapters their own); set finetune.lora_rank = 0 or change {key}")
    return p
