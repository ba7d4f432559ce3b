"""ZeRO-3's start-up memory on the real engines, under mpirun -np 2, both backends: run by
tests/integration/test_zero_startup_mpi.py, which reads the lines it prints.

Per backend, on each rank: the peak resident memory (VmHWM, reset through /proc/self/clear_refs
so that the imports' peak does not hide the build's) grown while the engine is built, for a
zero=3 engine (parameters built unit by unit, each sharded and dropped) and, for contrast, a
zero=2 one (whole parameters on every rank, as every engine builds them). The optimizer's
state is built at start-up too, and dominates: AdamW's m and v, its per-element decay-rate
vector and, while that is made, up to four shard-sized copies in transit (TensorFlow's
from_host copies twice; optim.DeviceAdamW), so zero=3's growth is bounded by seven shards, four
units and a fixed allowance for the allocators, and zero=2's (the whole model, its broadcast
copy, the same optimizer) must exceed zero=3's by more than the whole model: in torch only,
whose CPU tensors are malloc'd and unmapped when freed; TensorFlow's allocator keeps what the
zero=3 engine freed and builds the zero=2 one in it (measured: 157 MiB grown after zero=3's 254).
zero=3's shard equals the shard of the whole-model init (params.init_params), and one training step gives a finite loss.
"""
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
V, T, L, C = 512, 16, 24, 256   # a model of ~76 MB in float32, ~3.2 MB per block
SLACK = 32 << 20                # the allocators' and Python's own growth while building
MODEL = [f"model.n_layer={L}", f"model.n_embd={C}", "model.n_head=4", f"model.vocab_size={V}",
         f"model.block_size={T}"]
COMMON = ["train.steps=1", "train.batch_size=4", "train.threads=1", "train.seed=1234"]


def status(key: str) -> int:
    from hvdllm.bench.common import proc_status  # after the frameworks' imports (see build)
    return proc_status(key)


def build_measured(rt, be, zero: int, extra=()):
    """(engine, cfg, peak resident bytes grown while building it)."""
    from hvdllm import config as config_mod
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    sets = [*MODEL, *COMMON, f"parallel.zero={zero}", *extra]
    cfg = config_mod.validate(config_mod.load(None, sets), world_size=rt.size)
    layout = Layout.from_config(cfg, rt.size, rt.rank)
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS now
        f.write("5")
    before = status("VmRSS")
    engine = build_engine(cfg, layout, rt, be)
    return engine, cfg, status("VmHWM") - before


def check(backend, rt, be):
    from hvdllm import params
    from hvdllm.flat import FlatLayout
    # a one-block model first: Horovod's fusion buffer and the frameworks' pools, allocated on
    # first use, are not the model's
    build_measured(rt, be, 3, ["model.n_layer=1"])[0].train_step(np.zeros((2, T), np.int64),
                                                                 np.zeros((2, T), np.int64), 1e-3)
    engine, cfg, grown = build_measured(rt, be, 3)
    z = engine.zero
    shard, unit = 4 * z.size, 4 * max(lay.total for lay in z.layouts)
    model_bytes = 4 * params.count(cfg.model)
    bound = 7 * shard + 4 * unit + SLACK
    print(f"{backend} rank {rt.rank}: zero=3 start-up grew {grown / 2**20:.1f} MiB (bound {bound / 2**20:.1f}: "
          f"shards {shard / 2**20:.1f}, unit {unit / 2**20:.1f}; whole model {model_bytes / 2**20:.1f})", flush=True)
    assert grown <= bound, (grown, bound)
    whole = params.init_params(cfg.model, cfg.train.seed)
    want = np.concatenate([lay.shard(FlatLayout({n: whole[n].shape for n in names}).flatten(whole), z.k, z.i)
                           for lay, names in zip(z.layouts, engine.owned)])
    del whole
    assert np.array_equal(z._host_p(), want), "zero=3's shard differs from the whole-model init's"
    rng = np.random.default_rng(rt.rank)
    x, y = rng.integers(0, V, (2, T)), rng.integers(0, V, (2, T))
    loss = engine.train_step(x, y, 1e-3).loss
    assert np.isfinite(loss), loss
    del engine, z
    engine, _, grown2 = build_measured(rt, be, 2)
    print(f"{backend} rank {rt.rank}: zero=2 start-up grew {grown2 / 2**20:.1f} MiB", flush=True)
    if backend == "torch":
        assert grown2 > grown + model_bytes, (grown2, grown, model_bytes)
    del engine
    print(f"{backend} zero3 start-up: within shards and units, shard equals the whole init", flush=True)


def main():
    sys.path.insert(0, str(ROOT))
    from hvdllm import backends, runtime
    assert int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) == 2, "run under mpirun -np 2"
    for backend in ("torch", "tensorflow"):
        be = backends.load(backend)
        be.configure(1)
        rt = runtime.start(be)
        check(backend, rt, be)


if __name__ == "__main__":
    main()
