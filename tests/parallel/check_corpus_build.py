"""Tokenising a corpus across ranks (not collected by pytest; tests/integration/test_corpora_mpi.py
runs it): `mpirun -np N python tests/parallel/check_corpus_build.py ROOT`.

ROOT/corpora.json names the corpora (DataConfig's keys, and own_cache, timeout_s);
every rank calls data.prepare on each (the collective build: file i on rank i % N, rank 0
joining) into ROOT/np<N>-<name>, and writes ROOT/result-<name>-<rank>.json: the cache folder or
the error it got. The test compares the folders with one-process builds."""
import json
import sys
from pathlib import Path

from mpi4py import MPI

from hvdllm import data
from hvdllm.config import DataConfig
from hvdllm.errors import USER_ERRORS

root = Path(sys.argv[1])
rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
for name, kw in json.loads((root / "corpora.json").read_text()).items():
    # "own_cache": a cache folder per rank, as on nodes that do not share one
    cache = root / (f"np{size}-{name}" + (f"-rank{rank}" if kw.pop("own_cache", False) else ""))
    timeout_s = kw.pop("timeout_s", 60)
    try:
        td = data.prepare(DataConfig(**kw), rank, cache_dir=cache, timeout_s=timeout_s)
        out = {"cache": td.meta["cache"]}
    except USER_ERRORS as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    # a file per rank: the ranks' printed lines interleave with the build's messages
    (root / f"result-{name}-{rank}.json").write_text(json.dumps({"rank": rank, "corpus": name, **out}))
