"""Host transfers per training step, under mpirun -np 2 (HVDLLM_BACKEND=torch|tensorflow), for
the engines hvdllm/parallelize.py builds: dp=2, ZeRO-1 at dp=2, pp=2 and tp=2.

The design's bound (hvdllm/engines.py): tensors stay the backend's own through a step; what crosses
to the host is the step's input batch, pipeline activations (p2p), and the flat vectors of the
strategies that still run in numpy (ZeRO-1) -- never one transfer per parameter. So every count
is the same for a 1-block and a 3-block model (a per-parameter transfer would grow with depth),
and plain dp and tp move nothing to the host but the scalars they log."""
import os

import numpy as np
import pytest

from hvdllm import backends, config, runtime
from hvdllm.layout import Layout
from hvdllm.parallelize import build_engine

BACKEND = os.environ.get("HVDLLM_BACKEND", "torch")
be = backends.load(BACKEND)
RT = runtime.start(be, None, [(0,), (1,)])   # the dp groups of pp=2 / tp=2 at np=2
STEPS = 2

LAYOUTS = {  # name: (settings, exact (to_host, from_host) per step or None: equal across depths only)
    "dp2": ([], (0, 2)),
    "zero1": (["parallel.zero=1"], (5, 6)),
    "tp2": (["parallel.tp=2"], (0, 2)),
    "pp2": (["parallel.pp=2", "parallel.microbatches=2"], None),
}


def per_step(settings, n_layer):
    sets = [f"model.n_layer={n_layer}", "model.n_embd=32", "model.n_head=4", "model.block_size=16",
            "model.vocab_size=256", "train.batch_size=4", f"backend={BACKEND}",
            *settings]
    cfg = config.validate(config.load(None, sets), RT.size)
    cfg = config.resolve(cfg, RT.size, 256)
    engine = build_engine(cfg, Layout.from_config(cfg, RT.size, RT.rank), RT, be)
    rng = np.random.default_rng(RT.rank)
    x, y = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
    engine.train_step(x, y, 1e-3)   # the first step traces (TensorFlow) and creates optimizer state
    before = dict(be.collectives.TRANSFERS)
    for _ in range(STEPS):
        engine.train_step(x, y, 1e-3)
    return tuple((be.collectives.TRANSFERS[k] - before[k]) / STEPS for k in ("to_host", "from_host"))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_host_transfers_per_step(name):
    settings, exact = LAYOUTS[name]
    shallow, deep = per_step(settings, 1), per_step(settings, 3)
    assert shallow == deep, f"{name}: (to_host, from_host) per step {shallow} at 1 block, {deep} at 3: " \
                            f"something crosses to the host per parameter"
    if exact is not None:
        assert shallow == exact, f"{name}: (to_host, from_host) per step {shallow}, the design says {exact}"
