"""`hvdllm generate OUT_DIR`: sample from a run's latest checkpoint, with either framework."""
from __future__ import annotations

import sys
from pathlib import Path

from . import checkpoint, config as config_mod, data
from .errors import CheckpointError
from .layout import Layout


def run(args) -> int:
    from . import runtime
    from .cli import load_backend
    out = Path(args.out_dir)
    cfg_path = out / "config.toml"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} not found: pass the train.out_dir of a finished run")
    cfg = config_mod.load(cfg_path, [f'backend="{args.backend}"'] if args.backend else [])
    cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp = 1, 1, 1
    path = checkpoint.latest(out)
    if path is None:
        raise CheckpointError(f"no checkpoint in {out / 'checkpoints'}: train first")
    state, meta = checkpoint.load(path)
    backend = load_backend(cfg.backend)
    rt = runtime.start(backend)
    tok = data.prepare(cfg.data, 0).tokenizer
    engine = backend.Engine(cfg, Layout.build(cfg.parallel, 1, 0))
    engine.load_state_dict(state)
    ids = engine.generate(tok.encode(args.prompt), args.tokens, args.temperature, args.top_k, args.seed)
    if rt.rank == 0:
        print(f"[hvdllm] {cfg.backend} sampling from {path} (trained with {meta.get('backend')})",
              file=sys.stderr)
        print(args.prompt + tok.decode(ids))
    return 0
