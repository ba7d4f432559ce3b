"""One rank of `hvdllm bench hf`, started by hvdllm/bench/hf.py under mpirun.

import   `--folder DIR` (a Hugging Face model folder) at tp = the job's ranks: the engine
         `hvdllm train` builds for it, then the weights read the way `train.init_from` reads them
         (hvdllm/hf.py: each rank only the slices it holds). Per rank: the seconds the read and
         assignment took, the bytes of parameters the rank holds, its resident memory after
         start-up, after building the engine and at its peak (ru_maxrss).
step     (np=1) training step time of a gpt2 and a llama of equal parameter count (`--width`,
         `--layers`), interleaved in rounds on the same batches.
"""
from __future__ import annotations

import resource
import time

import numpy as np

from hvdllm.bench import common

MIB = 2 ** 20


def parse(argv=None):
    p = common.worker_parser("hvdllm.bench.hf_worker", __doc__, steps=10, warmup=2)
    p.add_argument("what", choices=["import", "step"])
    p.add_argument("--folder", default="", help="import: the Hugging Face model folder")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    return p.parse_args(argv)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_anon() -> int:
    """Resident anonymous memory (what the process allocated: not the safetensors file's pages,
    which a memory-mapped read makes resident too and the kernel can drop)."""
    try:
        return common.proc_status("RssAnon")
    except KeyError:
        return 0


class AnonPeak:
    """The peak of rss_anon() while the block runs, sampled every 5 ms by a thread."""

    def __enter__(self):
        import threading
        self.peak, self._stop = rss_anon(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_anon())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def import_config(args, size: int):
    """The config `hvdllm train --set train.init_from=FOLDER --set parallel.tp=size` resolves to."""
    from hvdllm import config, hf
    from hvdllm.config import Config
    cfg = Config()
    cfg.backend, cfg.train.init_from, cfg.parallel.tp, cfg.train.threads = args.backend, args.folder, size, 1
    hf.apply_init_from(cfg)   # the folder's model settings, as `hvdllm train` takes them
    if cfg.model.vocab_size % 128:   # as nanoGPT pads GPT-2's: every tp degree up to 128 splits it,
        cfg.model.vocab_multiple = 128   # and each rank count imports the same table
    return config.resolve(config.validate(cfg, size), size, cfg.model.vocab_size)


def run_import(args, rt, backend) -> dict | None:
    from hvdllm import hf
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    start = rss()
    cfg = import_config(args, rt.size)
    engine = build_engine(cfg, Layout.from_config(cfg, rt.size, rt.rank), rt, backend)
    built = rss()
    _world().Barrier()   # every rank starts the read together
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        engine.load_state_dict(hf.fit_vocab_tables(hf.open_source(args.folder).weights(), cfg.model))
    seconds = time.perf_counter() - t0
    mine = {"rank": rt.rank, "read_s": seconds, "param_bytes": 4 * engine.num_params(),
            "rss_start_mib": start / MIB, "rss_built_mib": built / MIB, "anon_peak_read_mib": anon.peak / MIB,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB}
    ranks = _world().gather(mine, root=0)
    if rt.rank != 0:
        return None
    from hvdllm import params
    return {"what": "import", "backend": args.backend, "np": rt.size, "tp": rt.size,
            "family": cfg.model.family, "params": params.count(cfg.model), "ranks": ranks}


def llama_matching(width: int, layers: int, seq: int, vocab: int):
    """(gpt2 model config, llama model config) of (nearly) equal parameter count: the llama's
    SwiGLU width is chosen to match GPT-2's 4C MLP plus the biases and the position table."""
    from hvdllm import params
    from hvdllm.config import Config
    cfgs = []
    for family in ("gpt2", "llama"):
        c = Config()
        m = c.model
        m.family, m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size = family, layers, width, 4, seq, vocab
        m.dropout = 0.0
        cfgs.append(c)
    g, ll = cfgs
    target = params.count(g.model)
    base = params.count(_with(ll, ffn_hidden=1).model)
    per_unit = params.count(_with(ll, ffn_hidden=2).model) - base
    ll.model.ffn_hidden = max(1, 1 + round((target - base) / per_unit))
    return g, ll


def _with(cfg, **model):
    import copy
    c = copy.deepcopy(cfg)
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


def run_step(args, rt, backend) -> dict:
    from hvdllm import config, params
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    rng = np.random.default_rng(args.seed)
    fns, rows = {}, []
    for cfg in llama_matching(args.width, args.layers, args.seq, 256):
        cfg.backend, cfg.train.batch_size, cfg.train.threads = args.backend, args.batch, 1
        cfg = config.resolve(config.validate(cfg, 1), 1, 256)
        engine = build_engine(cfg, Layout.from_config(cfg, 1, 0), rt, backend)
        nxt = common.cycle(common.random_batches(cfg, rng))
        fns[cfg.model.family] = (lambda e, n: lambda: e.train_step(*n(), 1e-3))(engine, nxt)
        rows.append({"family": cfg.model.family, "params": params.count(cfg.model),
                     "ffn_hidden": params.ffn_hidden(cfg.model),
                     "flops_per_token": params.flops_per_token(cfg.model)})
    times = common.interleaved(fns, args.steps, args.warmup, args.per_round)
    for r in rows:
        r.update(common.summarize(times[r["family"]]))
    return {"what": "step", "backend": args.backend, "width": args.width, "layers": args.layers,
            "seq": args.seq, "batch": args.batch, "rows": rows}


def main(argv=None) -> int:
    args = parse(argv)
    if args.what == "step":
        return common.worker_main(args, lambda rt, be: run_step(args, rt, be), what="hvdllm bench hf")
    from hvdllm.cli import env_world_size, process_set_groups
    return common.worker_main(args, lambda rt, be: run_import(args, rt, be), what="hvdllm bench hf",
                              groups=lambda: process_set_groups(import_config(args, env_world_size())))


if __name__ == "__main__":
    raise SystemExit(main())
