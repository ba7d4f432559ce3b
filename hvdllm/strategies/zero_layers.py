"""ZeRO-2 / ZeRO-3 over a user's layer list (model.layers, hvdllm/user_model.py): the step,
sharding, checkpoints and start-up are ZeroSharded's and ShardedEngineBase's
(strategies/zero_sharded.py); this file only says what a unit is and where its first values
come from, for both backends' ShardedSequentialEngine (torch_backend/sharded_layers.py,
tf_backend/sharded_layers.py).

Units: one per layer of the list that has parameters; a parameter-free layer (a callable, an
activation) runs inside the unit before it (leading ones inside the first unit), since a unit
with nothing to gather or reduce would only add empty collectives. No parameter is shared
between layers (user_model.check_not_shared), so every unit owns all it uses: no borrowed names.

Start-up: the user's builder makes the whole list on every rank (it is the user's code; no
value-free construction exists for it), so each rank holds the whole model once while it starts.
Then, unit by unit, dp rank 0's values of the unit are sent to the dp group, sharded, and (stage
3) the unit's built values are freed before the next unit is read: after start-up a rank holds
its shards and, while a unit runs, that unit.
"""
from __future__ import annotations

import sys

from .. import user_model
from .zero_sharded import ShardedEngineBase


def layer_units(names_per_layer: list[list[str]]) -> list[list[int]]:
    """The layer indices of each unit: a layer with parameters starts a unit, parameter-free
    layers join the unit before them (leading ones the first unit)."""
    starts = [i for i, names in enumerate(names_per_layer) if names]
    if not starts:
        raise user_model.error("parallel.zero >= 2 shards parameters, and no layer of the list has any")
    bounds = [0, *starts[1:], len(names_per_layer)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


class ShardedLayersBase(ShardedEngineBase):
    """ShardedEngineBase on a user's layer list. The backend sets, before `_shard_layers`:
    `layers` (the built list), `names_per_layer` ({layer}.{name} of each layer's trainable
    parameters, in a fixed order), `param_shapes` ({name: shape}), `named` ([(name, parameter)]
    in unit order), and supplies the Runner primitives on the list, plus `free_built(names)`
    (stage 3: drop the built values of names once sharded)."""

    param_shapes = None   # an instance attribute here (GPTEngineBase derives it from the config)

    def _shard_layers(self) -> None:
        self.unit_layers = layer_units(self.names_per_layer)
        self._shard_model()

    def _units(self, layers=None):
        owned = [[n for i in group for n in self.names_per_layer[i]] for group in self.unit_layers]
        return list(range(len(owned))), (owned, owned)

    def _unit_flats(self):
        """Stage 3: each unit's built values, dp rank 0's sent to the dp group; the unit's built
        values freed as soon as they are joined, before the next unit is read."""
        by_name = dict(self.named)
        for names in self.owned:
            flat = self.concat_flat([by_name[n] for n in names])
            self.free_built(names)
            if self.comm.size > 1:
                flat = self.comm.broadcast(flat, root=0, name="init.unit")
            yield flat

    def local_shapes(self) -> dict[str, tuple]:
        return dict(self.param_shapes)

    def _describe(self) -> None:
        if self.layout.rank == 0:
            print(f"[hvdllm] model.layers={self.cfg.model.layers}: {len(self.names_per_layer)} layers in "
                  f"{len(self.unit_layers)} ZeRO-{self.cfg.parallel.zero} units, {self.num_params()} parameters",
                  file=sys.stderr)

    def full_params(self) -> dict:
        return self.host_params()

    def load_state_dict(self, state) -> None:
        user_model.check_state(state, self.param_shapes, self.cfg.model.layers)
        super().load_state_dict(state)
