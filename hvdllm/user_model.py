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
- Tensor parallelism (parallel.tp > 1) follows `model.tp_plan`, comma-separated `pattern=style`
  entries, e.g. "*.fc=column, *.proj=row". Patterns are fnmatch patterns (`*` also spans dots)
  over module paths: "{layer_index}" for a layer of the list, "{layer_index}.{attr}" for its
  sub-modules, nested attributes joined by dots and list/Sequential members by their index
  ("1.fc", "2.blocks.0.proj"): torch, the layer's named_modules(); Keras, its public attributes
  that hold Keras layers (or lists of them). So one plan string serves the same model written in
  either framework. The first entry that matches a path gives its style:
    column     a torch nn.Linear / Keras Dense split along its output features: its input passes
               f (identity forward, allreduce of the gradient backward over the tp group), its
               output stays split;
    row        split along its input features (so it takes a column module's split output): its
               partial output is allreduced forward (g), then the bias is added once;
    replicate  every tp rank holds it whole (the default for anything unmatched).
  Rules, checked before training (ConfigError naming model.tp_plan): every pattern matches some
  module; column / row name an nn.Linear / Dense (a subclass that overrides forward / call is not
  one); tp divides their output / input features; parallel.tp > 1 needs a plan; and every layer
  of the list must still return what it returned without the plan (checked on the probe batch),
  so a column module's split output must reach a row module inside the same layer. Weights are
  cut from the identically seeded whole layer, so tp = 2 computes what tp = 1 does. Split
  parameters and their AdamW moments are stored as slices (placement.py): torch weights are
  (out, in), so column splits axis 0 and row axis 1; Keras kernels are (in, out), so column
  splits axis 1 and row axis 0; a column bias splits, a row bias does not. A checkpoint written
  at one tp loads at any other (or without a plan at tp = 1).
- train.precision = 'bf16' / 'fp16': torch runs the layers under torch.autocast(bfloat16 /
  float16), Keras builds them under the 'mixed_bfloat16' / 'mixed_float16' dtype policy (float32
  weights); fp16's loss is scaled and the step skipped on an overflow exactly as for the built-in
  GPT (the functions at the end of this file). Under dp, pp and ZeRO-2/3; not yet beside tp
  (refused).
- ZeRO-2 / ZeRO-3 (parallel.zero = 2 / 3, data parallel only): one unit per layer that has
  parameters (strategies/zero_layers.py); TensorFlow layers must have no non-trainable weights.
  Checkpoints keep the same names, as ranges of each dp rank's shards, and load at any layout.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np

from . import placement
from .errors import CheckpointError, ConfigError

KEY = "model.layers"
PLAN_KEY = "model.tp_plan"
TP_STYLES = ("column", "row", "replicate")


def error(text: str) -> ConfigError:
    """A one-problem ConfigError naming model.layers (the text is folded onto one line)."""
    return ConfigError([f"{KEY}: " + " ".join(str(text).split())])


def problems(cfg) -> list[str]:
    """Configuration rules for a user's layer list (called from config.validate)."""
    spec = cfg.model.layers
    if not spec:
        return [f"{PLAN_KEY}: applies to a user's layer list ({KEY}); the built-in GPT has its own "
                f"tensor-parallel plan"] if cfg.model.tp_plan.strip() else []
    p = []
    mod, _, fn = spec.rpartition(":")
    if not mod or not fn:
        p.append(f"{KEY}: {spec!r} is not 'module:function' (e.g. 'mypkg.models:build' or "
                 f"'models.py:build')")
    par = cfg.parallel
    p.extend(parse_plan(cfg.model.tp_plan)[1])
    if par.tp > 1 and not parse_plan(cfg.model.tp_plan)[0]:
        p.append(f"{PLAN_KEY}: parallel.tp={par.tp} with {KEY} needs a plan naming the Linear / Dense "
                 f"modules to split, e.g. '*.fc=column, *.proj=row'")
    if par.zero == 1:
        p.append(f"parallel.zero: ZeRO-1 is not wired for {KEY}; set parallel.zero = 2 (gradients and "
                 f"optimizer state sharded, one unit per layer), 3 (parameters too) or 0")
    if par.zero >= 2 and par.pp > 1:
        p.append(f"parallel.pp: ZeRO-{par.zero} over {KEY} runs without pipeline stages; set "
                 f"parallel.pp = 1 (or parallel.zero = 0)")
    if par.zero >= 2 and par.tp > 1:
        p.append(f"parallel.tp: ZeRO-{par.zero} over {KEY} runs without tensor parallelism; set "
                 f"parallel.tp = 1 (or parallel.zero = 0)")
    if par.tp > 1 and cfg.train.precision != "fp32":
        # not proven yet: the plan's output check would run in 16 bits, and Horovod's CPU ops
        # take no bfloat16 partial sums
        p.append(f"train.precision: '{cfg.train.precision}' over {KEY} runs under data and pipeline "
                 f"parallelism and ZeRO-2/3, not yet beside parallel.tp = {par.tp}; use 'fp32' or "
                 f"parallel.tp = 1")
    for key, bad in (("localsgd.every", cfg.localsgd.every), ("ps.servers", cfg.ps.servers),
                     ("roles.evaluators", cfg.roles.evaluators), ("roles.generators", cfg.roles.generators)):
        if bad:
            p.append(f"{key}: not combinable with {KEY} (a user's layer list runs data, pipeline "
                     f"and tensor parallelism and ZeRO-2/3 only); unset {key}")
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
    except BaseException as e:  # an import can raise anything; say which spec and why
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
    except BaseException as e:  # user code
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


# -- tensor parallelism by model.tp_plan ---------------------------------------------------------
def plan_error(problems) -> ConfigError:
    """A ConfigError naming model.tp_plan, one line per problem."""
    problems = [problems] if isinstance(problems, str) else problems
    return ConfigError([f"{PLAN_KEY}: " + " ".join(str(t).split()) for t in problems])


def parse_plan(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """'pattern=style, ...' -> ([(pattern, style)], problems)."""
    entries, p = [], []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        pattern, eq, style = (s.strip() for s in item.partition("="))
        if not eq or not pattern or not style:
            p.append(f"{PLAN_KEY}: {item.strip()!r} is not 'pattern=style' (e.g. '*.fc=column')")
        elif style not in TP_STYLES:
            p.append(f"{PLAN_KEY}: {item.strip()!r}: unknown style {style!r}; use column, row or replicate")
        else:
            entries.append((pattern, style))
    return entries, p


def resolve_plan(text: str, modules: dict, tp: int, kind: str) -> dict[str, str]:
    """{module path: 'column' | 'row'} for the modules the plan splits. `modules`: every module
    path of the whole list (in order) -> (in_features, out_features) for a splittable `kind`
    (nn.Linear / Dense), None for anything else. Raises one ConfigError with every problem."""
    entries, p = parse_plan(text)
    styles = {}
    for pattern, style in entries:
        hits = [m for m in modules if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            p.append(f"{pattern!r} matches no module; the paths are e.g. "
                     + ", ".join(list(modules)[:12]) + (" ..." if len(modules) > 12 else ""))
        for path in hits:
            styles.setdefault(path, style)   # the first matching entry decides
    out = {}
    for path, style in styles.items():
        if style == "replicate":
            continue
        if modules[path] is None:
            p.append(f"{path!r} ({style}) is not a {kind}")
            continue
        n = modules[path][1 if style == "column" else 0]
        if n % tp:
            p.append(f"{path!r} ({style}): its {n} {'output' if style == 'column' else 'input'} "
                     f"features are not divisible by parallel.tp={tp}")
        out[path] = style
    if p:
        raise plan_error([x.removeprefix(f"{PLAN_KEY}: ") for x in p])
    return out


def split_placement(style: str, role: str, out_axis: int, tp: int, rank: int) -> dict | None:
    """Where tp rank `rank`'s slice of a column / row module's 'weight' or 'bias' sits;
    `out_axis` is the weight's output-feature axis (torch Linear 0, Keras Dense kernel 1)."""
    if role == "bias":
        return placement.make(0, tp, rank) if style == "column" else None
    return placement.make(out_axis if style == "column" else 1 - out_axis, tp, rank)


def with_moments(placements: dict) -> dict:
    """Parameter placements plus those of their AdamW moments ('optim.m.<name>', 'optim.v.<name>')."""
    out = dict(placements)
    for n, pl in placements.items():
        out[f"optim.m.{n}"] = out[f"optim.v.{n}"] = pl
    return out


def check_output(layer_index: int, got: np.ndarray, want: np.ndarray) -> None:
    """A layer under the plan must return what the whole layer returned on the probe batch."""
    if tuple(got.shape) != tuple(want.shape):
        raise plan_error(f"layer {layer_index} returns shape {tuple(got.shape)} under the plan, "
                         f"{tuple(want.shape)} without it: a column module's split output must reach "
                         f"a row module inside the same layer")
    if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise plan_error(f"layer {layer_index} computes other values under the plan (max difference "
                         f"{float(np.max(np.abs(got - want))):.3g}): a row module must take a column "
                         f"module's split output, and nothing between them may mix features")


def check_state(state, shapes: dict[str, tuple], spec: str) -> None:
    """Every name in `shapes` present in a checkpoint's state with that whole shape."""
    have = getattr(state, "shapes", None)

    def shape(n):
        return tuple(have[n]) if have is not None else tuple(np.shape(state[n]))
    p = [f"{n}: missing" for n in shapes if n not in state]
    p += [f"{n}: {shape(n)} != {tuple(s)}" for n, s in shapes.items() if n in state and shape(n) != tuple(s)]
    if p:
        raise CheckpointError(f"checkpoint does not match {KEY}={spec}: " + "; ".join(p[:5]))


def load_slices(state, weights: list[str], trainable: list[str], shapes: dict, placements: dict,
                spec: str) -> dict:
    """For an engine's load_state_dict: check the `weights` against their whole `shapes`, then
    this rank's slices of them, of the `trainable` ones' AdamW moments and of optim.step."""
    check_state(state, {n: shapes[n] for n in weights}, spec)
    return local_state(state, weights + [f"optim.{k}.{n}" for k in "mv" for n in trainable] + ["optim.step"],
                       placements)


def local_state(state, names, placements: dict) -> dict:
    """This rank's slices of the `names` present in `state` (a dict of whole arrays, or a
    checkpoint.Sharded, which reads only the shard files it needs)."""
    if hasattr(state, "slice"):
        return {n: state.slice(n, placements.get(n)) for n in names if n in state}
    return {n: placement.take(np.asarray(state[n]), placements.get(n)) for n in names if n in state}


def gather_whole(local: dict, placements: dict, allgather) -> dict:
    """{name: whole array}: tp-split arrays gathered over the tp group (`allgather(name, a)` ->
    every tp rank's slice stacked, in rank order; every tp rank calls this), the rest as they are."""
    out = {}
    for n, a in local.items():
        pl = placements.get(n)
        if pl is None:
            out[n] = a
            continue
        every = allgather(n, np.ascontiguousarray(a))
        out[n] = placement.assemble([(s, placement.make(pl["axis"], pl["parts"], r, pl["groups"]))
                                     for r, s in enumerate(every)])
    return out


def grad_norm_sq(named_sq, split: set, tp_sum) -> float:
    """Squared gradient norm over a stage's tp group: split parameters summed over the group
    (`tp_sum`, called on every tp rank), replicated ones counted once."""
    named_sq = list(named_sq)
    return (tp_sum(sum(s for n, s in named_sq if n in split))
            + sum(s for n, s in named_sq if n not in split))


# -- train.precision = 'fp16': dynamic loss scaling (hvdllm/loss_scale.py), both backends ---------
def scaled(engine, loss):
    """What a micro-batch's loss share starts its backward from: itself, times the scaler's
    scale under fp16 (the same on every rank and stage: the testing aid's overflow enters at
    inject_overflow instead, so that it reaches a stage that holds no loss too)."""
    return loss if engine.scaler is None else loss * engine.scaler.scale


def inject_overflow(engine, grads: list) -> None:
    """train.fail_mode = 'overflow' (EngineBase._step_scale set this step's scale to inf on this
    rank): one of this rank's gradients becomes non-finite before the dp reduction, a tp-split
    one where there is one (a replicated parameter's square is counted on its own tp rank only,
    as its real gradient is the same on every tp rank)."""
    if engine.scaler is None or engine.scale == engine.scaler.scale or not grads:
        return
    split = getattr(engine, "split", ())
    i = next((k for k, (n, _) in enumerate(engine.named) if n in split), 0)
    grads[i] = grads[i] * float("inf")


def clip_or_skip(norm: float, clip: float, scaler) -> tuple[float, float | None]:
    """(the gradient norm, the factor the reduced gradients are multiplied by before AdamW, or
    None: skip the step). Under fp16 the gradients carry the loss scale: the norm is divided by
    it (clipping sees the true one) and so is the factor. `norm` is the job's (summed over the
    dp group by the allreduce, over tp and every stage), so an overflow on any rank makes it
    non-finite on all and every rank skips the same step."""
    from .optim import clip_coef
    if scaler is None:
        return norm, clip_coef(norm, clip)
    norm = norm / scaler.scale
    return norm, (clip_coef(norm, clip) / scaler.scale if np.isfinite(norm) else None)


def update_scaler(scaler, norm: float) -> bool:
    """After the step: whether it was skipped (fp16 and a non-finite norm); the scale follows."""
    if scaler is None:
        return False
    finite = bool(np.isfinite(norm))
    scaler.update(finite)
    return not finite
