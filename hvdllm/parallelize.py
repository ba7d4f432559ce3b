"""The one place where strategies are composed into an engine (torchtitan's `parallelize` is the
model). The trainer, the role ranks, `hvdllm generate` and the benchmarks all call `build_engine`;
a backend only supplies the classes and never decides which strategies apply.

The order, and why:
  1. the model's kind: a user's layer list (SequentialEngine: it places its own layers on the
     pipeline and applies model.tp_plan itself; ShardedSequentialEngine under ZeRO-2/3, one
     unit per layer) or the built-in GPT;
  2. tensor parallelism: the tp group's collectives, built before the model so each rank
     creates only its slices;
  3. pipeline stages (PipelineEngine) when parallel.pp > 1, else one data-parallel Engine over
     the dp group; ZeRO-1 and local SGD sit inside either (they replace the optimizer step and
     its gradient reduction); ZeRO-2/3 (parallel.zero >= 2) replace the data-parallel Engine by
     ShardedEngine and a stage by ShardedPipelineEngine (strategies/zero_sharded.py: the step
     runs unit by unit, each stage's units sharded over its dp group);
  4. parameter-server workers (ps.servers > 0) wrap the engine last: they take its local
     gradients and replace its reduction and optimizer by the servers' update.
"""
from __future__ import annotations

from .engine import Engine
from .layout import Layout


def build_engine(cfg, layout: Layout, rt, backend, *, wrap_ps: bool = True) -> Engine:
    """The engine this rank trains with (collective: every trainer rank calls it)."""
    if cfg.model.layers:                                          # 1. a user's layer list (ZeRO-2/3:
        cls = backend.ShardedSequentialEngine if cfg.parallel.zero >= 2 else backend.SequentialEngine  # zero_layers.py)
        engine = cls(cfg, layout, rt)
    else:
        tp = backend.TPGroup(backend.Collectives(rt.process_set(layout.group("tp")))) \
            if layout.tp > 1 else None                             # 2. tensor parallelism
        if layout.pp > 1:                                          # 3. pipeline stages (ZeRO-2/3:
            cls = backend.ShardedPipelineEngine if cfg.parallel.zero >= 2 else backend.PipelineEngine  # per stage)
            engine = cls(cfg, layout, rt, tp)
        else:                                                      # 3. data parallel (ZeRO-2/3:
            cls = backend.ShardedEngine if cfg.parallel.zero >= 2 else backend.Engine   # zero_sharded.py)
            engine = cls(cfg, layout, backend.Collectives(rt.process_set(layout.group("dp"))), tp)
    if wrap_ps and cfg.ps.servers:                                 # 4. parameter-server workers
        from .strategies.ps_worker import PSWorker
        engine = PSWorker(engine, cfg, layout, rt)
    return engine


def build_solo_engine(cfg, rt, backend, ranks=None) -> Engine:
    """A one-rank GPT engine outside the trainers' collectives (evaluators, generators,
    `hvdllm generate`): its own one-rank Horovod process set `ranks` (None: the global set of a
    one-rank job)."""
    solo = Layout(world_size=1, rank=0, dp=1)
    return backend.Engine(cfg, solo, backend.Collectives(rt.process_set(ranks) if ranks else None))
