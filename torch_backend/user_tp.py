"""Tensor parallelism for a user's torch layers by model.tp_plan (hvdllm/user_model.py): each
nn.Linear the plan names becomes a column- or row-parallel module holding this tp rank's slice of
the whole, identically seeded layer, with Megatron-LM's f / g (torch_backend/tensor_parallel.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hvdllm import user_model

from .collectives import Collectives
from .tensor_parallel import TPGroup, copy_to_tp, reduce_from_tp


class ParallelLinear(nn.Module):
    """A column- (output features split) or row-parallel (input features split) nn.Linear;
    `placements` says where its 'weight' and 'bias' slices sit in the whole arrays."""

    def __init__(self, full: nn.Linear, style: str, group: TPGroup):
        super().__init__()
        self.style, self.group, self.placements = style, group, {}
        for role in ("weight", "bias"):
            whole = getattr(full, role)
            if whole is None:
                self.register_parameter(role, None)
                continue
            pl = user_model.split_placement(style, role, 0, group.size, group.rank)
            self.placements[role] = pl
            part = user_model.placement.take(whole.detach().numpy(), pl)
            self.register_parameter(role, nn.Parameter(torch.from_numpy(np.array(part)),
                                                       requires_grad=whole.requires_grad))

    def forward(self, x):
        if self.style == "column":
            return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def modules(layers) -> dict:
    """Every module path of the list ('{i}', '{i}.{sub}') -> (in, out) for an nn.Linear, else None."""
    return {f"{i}.{n}" if n else str(i): (m.in_features, m.out_features) if _is_linear(m) else None
            for i, layer in enumerate(layers) for n, m in layer.named_modules()}


def apply(cfg, layout, rt, all_layers, mine: dict, inputs) -> tuple[TPGroup | None, dict]:
    """Resolve model.tp_plan over the whole list (every rank, so errors agree), then replace the
    planned nn.Linear modules of this rank's layers (`mine`, {index: module}, edited in place).
    Each changed layer is checked against its whole-layer output on the probe (`inputs`).
    Returns the tp group (None when nothing splits) and {parameter name: placement}."""
    styles = user_model.resolve_plan(cfg.model.tp_plan, modules(all_layers), layout.tp, "torch nn.Linear")
    if layout.tp == 1 or not styles:
        return None, {}
    group = TPGroup(Collectives(rt.process_set(layout.group("tp"))))
    placements, changed = {}, set()
    for path, style in styles.items():
        i, _, sub = path.partition(".")
        if int(i) not in mine:
            continue
        parent_path, _, attr = sub.rpartition(".")
        parent = mine[int(i)].get_submodule(parent_path) if sub else None
        new = ParallelLinear(getattr(parent, attr) if sub else mine[int(i)], style, group)
        if sub:
            setattr(parent, attr, new)
        else:
            mine[int(i)] = new
        placements.update({f"{path}.{role}": pl for role, pl in new.placements.items()})
        changed.add(int(i))
    for i in sorted(changed):   # every tp rank of this stage, in the same order
        layer = mine[i].eval()
        try:
            with torch.no_grad():
                got = layer(inputs[i]).numpy()
        except Exception as e:  # a plan that breaks the layer's shapes
            raise user_model.plan_error(f"layer {i} fails under the plan ({type(e).__name__}: {e}); a "
                                        f"row module takes a column module's split output") from e
        user_model.check_output(i, got, inputs[i + 1].numpy())
        layer.train()
    return group, placements


def allgather(group: TPGroup):
    """For user_model.gather_whole: every tp rank's slice of an array, stacked."""
    return lambda name, a: group.coll.allgather(torch.from_numpy(a)[None], name=f"seq.tp.gather.{name}").numpy()


def tp_sum(group: TPGroup | None):
    """For user_model.grad_norm_sq: a float summed over the tp group."""
    if group is None:
        return float
    return lambda x: float(group.coll.allreduce(torch.tensor([x], dtype=torch.float64), op="sum",
                                                name="seq.tp.normsq")[0])
