"""Tensor parallelism for a user's Keras layers by model.tp_plan (hvdllm/user_model.py): the
TensorFlow twin of torch_backend/user_tp.py. Each Dense the plan names is swapped, in its parent
layer, for a column- or row-parallel layer holding this tp rank's slice of the built, identically
seeded Dense, with Megatron-LM's f / g (tf_backend/tensor_parallel.py). Module paths are the
layer's public attributes holding Keras layers (lists of them by index)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from hvdllm import user_model

from .collectives import Collectives
from .tensor_parallel import TPGroup, copy_to_tp, reduce_from_tp


class ParallelDense(keras.layers.Layer):
    """A column- (output features split) or row-parallel (input features split) Dense; its
    weights keep the short names 'kernel' and 'bias', so checkpoint names do not change."""

    def __init__(self, full: keras.layers.Dense, style: str, group: TPGroup):
        super().__init__(name=f"{full.name}_{style}", dtype=full.dtype_policy)
        self.style, self.group, self.activation = style, group, full.activation
        self.placements, self.bias = {}, None
        for role, whole in (("kernel", full.kernel), ("bias", full.bias)):
            if whole is None:
                continue
            pl = user_model.split_placement(style, "weight" if role == "kernel" else role, 1,
                                            group.size, group.rank)
            part = user_model.placement.take(np.asarray(whole.numpy()), pl)
            var = self.add_weight(shape=part.shape, initializer="zeros", name=role, trainable=whole.trainable)
            var.assign(part)
            self.placements[id(var)] = pl
            setattr(self, role, var)
        self.built = True

    def call(self, x):
        if self.style == "column":
            y = keras.ops.matmul(copy_to_tp(x, self.group), self.kernel)
            y = y if self.bias is None else keras.ops.add(y, self.bias)
        else:
            y = reduce_from_tp(keras.ops.matmul(x, self.kernel), self.group)
            y = y if self.bias is None else keras.ops.add(y, self.bias)
        return y if self.activation is None else self.activation(y)


def _is_dense(layer) -> bool:
    """A built plain Dense (not a subclass with its own call, not LoRA or quantized)."""
    return (isinstance(layer, keras.layers.Dense) and type(layer).call is keras.layers.Dense.call
            and layer.built and not getattr(layer, "lora_enabled", False)
            and not getattr(layer, "quantization_mode", None))


def _walk(layer, path, seen):
    """(path, layer, put) for the sub-layers of `layer`, each once (the first path that reaches
    it); put(new) swaps one in its parent."""
    if not isinstance(layer, keras.layers.Layer):
        return
    seen.add(id(layer))
    for attr, value in list(vars(layer).items()):
        if attr.startswith("_"):
            continue
        items = [(f"{path}.{attr}", value, lambda v, a=attr: object.__setattr__(layer, a, v))]
        if isinstance(value, (list, tuple)):
            put = value.__setitem__ if isinstance(value, list) else None
            items = [(f"{path}.{attr}.{k}", item, put and (lambda v, k=k, put=put: put(k, v)))
                     for k, item in enumerate(value)]
        for sub, item, assign in items:
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                yield sub, item, assign and _setter(layer, item, assign)
                yield from _walk(item, sub, seen)


def _setter(parent, old, assign):
    def put(new):   # keep the parent's sub-layer order (and so its weights' order and names)
        parent._tracker.replace_tracked_value("layers", old, new)
        assign(new)
    return put


def _all(layers: dict):
    for i, layer in layers.items():
        yield str(i), layer, None
        yield from _walk(layer, str(i), set())


def modules(layers) -> dict:
    """Every module path of the list -> (in, out) for a Dense, else None."""
    return {path: tuple(int(d) for d in m.kernel.shape) if _is_dense(m) else None
            for path, m, _ in _all(dict(enumerate(layers)))}


def apply(cfg, layout, rt, all_layers, mine: dict, inputs) -> tuple[TPGroup | None, dict]:
    """Resolve model.tp_plan over the whole list, swap the planned Dense layers of this rank's
    layers (`mine`, edited in place) and check each changed layer against its probe output.
    Returns the tp group (None when nothing splits) and {id(keras variable): placement}."""
    styles = user_model.resolve_plan(cfg.model.tp_plan, modules(all_layers), layout.tp, "Keras Dense")
    if layout.tp == 1 or not styles:
        return None, {}
    group = TPGroup(Collectives(rt.process_set(layout.group("tp"))))
    placements, changed = {}, set()
    found = {path: (m, put) for path, m, put in _all(mine)}
    for path, style in styles.items():
        if path not in found:   # another stage's layer
            continue
        old, put = found[path]
        new = ParallelDense(old, style, group)
        i = int(path.split(".")[0])
        if put is None and "." in path:
            raise user_model.plan_error(f"{path!r}: cannot swap a Dense held in a tuple")
        if put is None:
            mine[i] = new
        else:
            put(new)
        placements.update(new.placements)
        changed.add(i)
    for i in sorted(changed):   # every tp rank of this stage, in the same order
        try:
            got = mine[i](inputs[i], training=False).numpy()
        except Exception as e:  # a plan that breaks the layer's shapes
            raise user_model.plan_error(f"layer {i} fails under the plan ({type(e).__name__}: {e}); a "
                                        f"row module takes a column module's split output") from e
        user_model.check_output(i, got, inputs[i + 1].numpy())
    return group, placements


def allgather(group: TPGroup):
    """For user_model.gather_whole: every tp rank's slice of an array, stacked."""
    return lambda name, a: np.asarray(group.coll.allgather(tf.constant(a)[None], name=f"seq.tp.gather.{name}"))


def tp_sum(group: TPGroup | None):
    """For user_model.grad_norm_sq: a float summed over the tp group."""
    if group is None:
        return float
    return lambda x: float(group.coll.allreduce(tf.constant([x], tf.float64), op="sum", name="seq.tp.normsq")[0])
