"""`hvdllm convert SRC OUT`: one unsharded file from a run or a checkpoint.

A checkpoint is a folder of shards (checkpoint.py: one file per pipeline stage and tensor rank,
each array's slices with their placement). This reassembles every array whole and writes one
.npz: the parameters only, or with --optimizer also the AdamW moments and step, which makes the
file a single-file checkpoint that `train.resume` loads under any layout when placed in
`checkpoints/` as step_XXXXXXXX.npz. With --hf the parameters are renamed to Hugging Face GPT-2
keys (`transformer.h.0.attn.c_attn.weight`, ...; the (in, out) Conv1D layout is already GPT-2's).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import checkpoint
from .errors import CheckpointError


def resolve(src) -> Path:
    p = Path(src)
    if (p / checkpoint.MANIFEST).exists():   # a checkpoint folder itself
        return p
    if p.is_dir():
        latest = checkpoint.latest(p)
        if latest is None:
            raise CheckpointError(f"no checkpoint under {p / 'checkpoints'}")
        return latest
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a run's out_dir or a checkpoints/step_* folder")
    return p


def hf_name(name: str) -> str:
    return "transformer." + name


def run(args) -> int:
    src = resolve(args.src)
    state, meta = checkpoint.load(src)
    keep_all = getattr(args, "optimizer", False) and not args.hf
    params = {k: state[k] for k in state if keep_all or not k.startswith(("optim.", "localsgd."))}
    if args.hf:
        params = {hf_name(k): v for k, v in params.items()}
        params["lm_head.weight"] = params["transformer.wte"]
        params["transformer.wte.weight"] = params.pop("transformer.wte")
        params["transformer.wpe.weight"] = params.pop("transformer.wpe")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        meta = {k: v for k, v in meta.items() if k not in ("format", "shards")}
        np.savez(f, **params, __meta__=np.array(json.dumps({**meta, "converted_from": str(src)})))
    os.replace(tmp, out)
    n = sum(int(v.size) for k, v in params.items() if k != "lm_head.weight")
    print(f"[hvdllm] wrote {out}: {len(params)} arrays, {n / 1e6:.2f} M parameters (step {meta['step']})")
    return 0
