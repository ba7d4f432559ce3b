"""`hvdllm generate OUT_DIR`: sample from a run's latest checkpoint, with either framework."""
from __future__ import annotations

import sys
from pathlib import Path

from . import checkpoint, config as config_mod, data
from .errors import CheckpointError


def run(args) -> int:
    from . import backends, runtime
    from .parallelize import build_solo_engine
    out = Path(args.out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} not found: pass the train.out_dir of a finished run")
    # one process holds the whole model, whatever layout trained it
    sets = ["parallel.dp=1", "parallel.pp=1", "parallel.tp=1"] + ([f'backend="{args.backend}"'] if args.backend else [])
    cfg = config_mod.load(cfg_path, sets)
    path = checkpoint.latest(out)
    if path is None:
        raise CheckpointError(f"no checkpoint in {out / 'checkpoints'}: train first")
    state, meta = checkpoint.load(path)
    backend = backends.load(cfg.backend)
    rt = runtime.start(backend)
    tok = data.prepare(cfg.data, 0).tokenizer
    engine = build_solo_engine(cfg, rt, backend)
    engine.load_state_dict(state)
    ids = engine.generate(tok.encode(args.prompt), args.tokens, args.temperature, args.top_k, args.seed)
    if rt.rank == 0:
        print(f"[hvdllm] {cfg.backend} sampling from {path} (trained with {meta.get('backend')})",
              file=sys.stderr)
        print(args.prompt + tok.decode(ids))
    return 0
