"""Host transfers per training step, under mpirun -np 2 (HVDLLM_BACKEND=torch|tensorflow), for
the engines hvdllm/parallelize.py builds: dp=2, ZeRO-1/2/3 at dp=2 (ZeRO-3 also with the optimizer
offloaded), local SGD at dp=2, tp=2, pp=2, and ZeRO-1 in a pp=2 stage.

The design's bound (the device seam, hvdllm/engines.py): tensors stay the backend's own through a
step, ZeRO-1 and local SGD included (they run on the backend's tensors through its Collectives);
what crosses to the host is the step's input batch (x and y: from_host 2) and, in a pipeline,
the activations and gradients between stages (p2p). The scalars a step logs (loss, gradient norm)
are read as Python floats, not counted. So dp, ZeRO-1, local SGD and tp are held to exactly
(to_host, from_host) = (0, 2) at every step (ZeRO-2/3 too; ZeRO-3 offloaded adds its shard's one
trip out and back) -- local SGD at a step that averages and at one that
does not, each counted on its own -- and every count is the same for a 1-block and a 3-block
model (a per-parameter transfer would grow with depth). ZeRO-1 inside a pipeline stage moves exactly
what the plain stage does."""
import os

import numpy as np
import pytest

from hvdllm import backends, config, runtime
from hvdllm.layout import Layout
from hvdllm.parallelize import build_engine

BACKEND = os.environ.get("HVDLLM_BACKEND", "torch")
be = backends.load(BACKEND)
RT = runtime.start(be, None, [(0,), (1,)])   # the dp groups of pp=2 / tp=2 at np=2
STEPS = 2                                    # counted after a first (tracing) step: steps 2 and 3

LAYOUTS = {  # name: (settings, exact (to_host, from_host) at every step, another layout's name: the same
    #          counts as that one, or None: equal across depths only)
    "dp2": ([], (0, 2)),
    "zero1": (["parallel.zero=1"], (0, 2)),
    "zero2": (["parallel.zero=2"], (0, 2)),       # strategies/zero_sharded.py: on the device too
    "zero3": (["parallel.zero=3"], (0, 2)),
    # the optimizer on the host: the clipped gradient shard out, the new parameter shard in
    "zero3offload": (["parallel.zero=3", "parallel.offload=optimizer"], (1, 3)),
    "localsgd": (["localsgd.every=2"], (0, 2)),   # step 2 averages the parameters, step 3 does not
    "tp2": (["parallel.tp=2"], (0, 2)),
    "pp2": (["parallel.pp=2", "parallel.microbatches=2"], None),
    # ZeRO-1 inside a pipeline stage (dp=1 here): on the device too, so exactly pp2's count
    "pp2zero1": (["parallel.pp=2", "parallel.microbatches=2", "parallel.zero=1"], "pp2"),
}


def per_step(settings, n_layer):
    """[(to_host, from_host)] of each counted step."""
    sets = [f"model.n_layer={n_layer}", "model.n_embd=32", "model.n_head=4", "model.block_size=16",
            "model.vocab_size=256", "train.batch_size=4", f"backend={BACKEND}",
            *settings]
    cfg = config.validate(config.load(None, sets), RT.size)
    cfg = config.resolve(cfg, RT.size, 256)
    engine = build_engine(cfg, Layout.from_config(cfg, RT.size, RT.rank), RT, be)
    rng = np.random.default_rng(RT.rank)
    x, y = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
    engine.train_step(x, y, 1e-3)   # the first step traces (TensorFlow) and creates optimizer state
    counts = []
    for _ in range(STEPS):
        before = dict(be.collectives.TRANSFERS)
        engine.train_step(x, y, 1e-3)
        counts.append(tuple(be.collectives.TRANSFERS[k] - before[k] for k in ("to_host", "from_host")))
    if engine.local is not None:   # the counted steps are one with an average and one without
        assert engine.local.syncs == 1, engine.local.syncs
    return counts


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_host_transfers_per_step(name):
    settings, exact = LAYOUTS[name]
    shallow, deep = per_step(settings, 1), per_step(settings, 3)
    assert shallow == deep, f"{name}: (to_host, from_host) per step {shallow} at 1 block, {deep} at 3: " \
                            f"something crosses to the host per parameter"
    if isinstance(exact, str):
        same = per_step(LAYOUTS[exact][0], 1)
        assert shallow == same, f"{name}: (to_host, from_host) per step {shallow}, {exact} moves {same}"
    elif exact is not None:
        assert shallow == [exact] * STEPS, f"{name}: (to_host, from_host) per step {shallow}, the design says {exact}"
