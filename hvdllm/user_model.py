"""A user's model as an ordered list of layers (`model.layers = "module:function"`), framework-free.

Contract (both backends' SequentialEngine, torch_backend/sequential.py and tf_backend/sequential.py):
- `model.layers` names a function as "package.module:function" or "path/to/file.py:function";
  it is called as `fn(model_cfg)` and returns the ordered layers for the configured backend:
  torch nn.Modules (a list, nn.Sequential or nn.ModuleList), or Keras layers / plain callables
  (a list or keras.Sequential) for TensorFlow.
- The layers form a token-in, logits-out language model: the first takes int64 token ids (B, T),
  each passes one tensor to the next, the last returns logits (B, T, model.vocab_size). The engine
  computes the mean cross-entropy loss. No parameter may be shared by two layers (a pipeline
  stage holds only its own layers); tied weights belong inside one layer.
- Seeding: the backend seeds its RNG (and Python's and numpy's) with train.seed right before the
  call, so every rank builds identical layers; no broadcast is needed across pipeline stages.
- Parameters are named "{layer_index}.{name}" in checkpoints: torch, the module's
  named_parameters(); Keras, each weight's short name in `layer.weights` order, with "_1", "_2"...
  appended to repeats within a layer. Such checkpoints are framework-specific.
- Partitioning over pipeline stages (parallel.partition): 'uniform' (one per layer), 'params'
  (parameter count per layer) or 'time' (forward+backward seconds per layer, measured once on
  world rank 0 and broadcast, so every rank splits the same way); see strategies/partition.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np

from .errors import ConfigError

KEY = "model.layers"


def error(text: str) -> ConfigError:
    """A one-problem ConfigError naming model.layers (the text is folded onto one line)."""
    return ConfigError([f"{KEY}: " + " ".join(str(text).split())])


def problems(cfg) -> list[str]:
    """Configuration rules for a user's layer list (called from config.validate)."""
    spec = cfg.model.layers
    if not spec:
        return []
    p = []
    mod, _, fn = spec.rpartition(":")
    if not mod or not fn:
        p.append(f"{KEY}: {spec!r} is not 'module:function' (e.g. 'mypkg.models:build' or "
                 f"'models.py:build')")
    par = cfg.parallel
    for key, bad in (("parallel.tp", par.tp > 1), ("parallel.zero", par.zero),
                     ("localsgd.every", cfg.localsgd.every), ("ps.servers", cfg.ps.servers),
                     ("roles.evaluators", cfg.roles.evaluators), ("roles.generators", cfg.roles.generators)):
        if bad:
            p.append(f"{key}: not combinable with {KEY} (a user's layer list runs data and pipeline "
                     f"parallelism only)")
    return p


def load_builder(spec: str):
    """The function named by 'module:function' or 'file.py:function'; ConfigError if it fails."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise error(f"{spec!r} is not 'module:function'")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise error(f"{spec!r}: no file {path}")
            name = "hvdllm_user_layers_" + path.stem
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except BaseException as e:  # noqa: an import can raise anything; say which spec and why
        raise error(f"cannot import {mod_name!r} from {spec!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"{spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


def build(model_cfg, seed: int, seed_backend) -> list:
    """Call the builder after seeding Python, numpy and the backend (`seed_backend(seed)`), so
    every rank gets identical layers. Returns the raw result (the backend flattens containers)."""
    fn = load_builder(model_cfg.layers)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_backend(seed)
    try:
        layers = fn(model_cfg)
    except BaseException as e:  # noqa: user code
        raise error(f"the builder {model_cfg.layers!r} raised {type(e).__name__}: {e}") from e
    if layers is None:
        raise error(f"the builder {model_cfg.layers!r} returned None, not a list of layers")
    return layers


def as_list(layers, containers=()) -> list:
    """A list from a list/tuple or one of the backend's sequential containers."""
    if isinstance(layers, containers):
        layers = list(layers)
    if not isinstance(layers, (list, tuple)):
        raise error(f"the builder returned {type(layers).__name__}, not a list of layers")
    if not layers:
        raise error("the builder returned an empty list of layers")
    return list(layers)


def unique_names(layer_index: int, names: list[str]) -> list[str]:
    """'{i}.{name}', with '_1', '_2'... appended to repeats within the layer."""
    seen, out = {}, []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(f"{layer_index}.{n}" + (f"_{k}" if k else ""))
    return out


def check_not_shared(owners: dict) -> None:
    """`owners`: {id(param): [layer indices using it]}: a parameter may belong to one layer."""
    for layers in owners.values():
        if len(set(layers)) > 1:
            raise error(f"layers {sorted(set(layers))} share a parameter; a pipeline stage holds "
                        f"only its own layers, so tie weights inside one layer instead")


def check_logits(shape, vocab_size: int) -> None:
    if len(shape) != 3 or shape[-1] != vocab_size:
        raise error(f"the last layer returned shape {tuple(shape)}; expected logits (batch, time, "
                    f"model.vocab_size={vocab_size})")


def split(costs: list[float], parts: int, method: str, rt, measure) -> list[tuple[int, int]]:
    """parallel.partition over the user's layers (strategies/partition.py checks that every layer
    is placed exactly once). 'time' calls `measure()` on world rank 0 only and broadcasts."""
    from .strategies.partition import partition
    if method == "time" and parts > 1:
        costs = rt.comm.bcast(measure() if rt.rank == 0 else None, root=0)
    try:
        return partition(list(costs), parts, method)
    except ConfigError as e:
        if parts > len(costs):
            raise error(f"{len(costs)} layers cannot fill {parts} pipeline parts (parallel.pp x "
                        f"parallel.virtual_stages); lower parallel.pp") from e
        raise
