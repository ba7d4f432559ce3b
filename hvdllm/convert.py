"""`hvdllm convert SRC OUT`: one unsharded file from a run or a checkpoint.

A checkpoint is a folder of shards (checkpoint.py: one file per pipeline stage and tensor rank,
each array's slices with their placement). This reassembles every array whole and writes one
.npz: the parameters only, or with --optimizer also the AdamW moments and step, which makes the
file a single-file checkpoint that `train.resume` loads under any layout when placed in
`checkpoints/` as step_XXXXXXXX.npz. With --hf the parameters get their Hugging Face keys and
orientation (hf.py's table: GPT-2's `transformer.h.0.attn.c_attn.weight`, ..., whose Conv1D is
already (in, out); Llama's `model.layers.0.self_attn.q_proj.weight`, ..., transposed), plus
`lm_head.weight` spelled out for a tied head.

Hugging Face folders (hvdllm/hf.py):
    hvdllm convert --from-hf DIR OUT    a model folder (config.json, safetensors, tokenizer.json)
                                        -> OUT, an hvdllm run folder (config.toml, checkpoint step 0)
    hvdllm convert RUN --to-hf DIR      a run (any layout, either framework) -> config.json,
                                        model.safetensors, tokenizer.json that transformers loads

A LoRA run (finetune.lora_rank > 0, hvdllm/lora.py) checkpoints only its adapters (and a
classifier's head); `--merge-lora` reads its base (the run's train.init_from) and writes the plain
model W + s * A^T B^T, with .npz or --to-hf. Without it, a LoRA run converts to its adapters.
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


def usage_problem(args) -> str | None:
    """Which positional arguments each form takes (checked before anything is read or written)."""
    paths = list(args.paths)
    if getattr(args, "merge_lora", False) and (args.from_hf or args.optimizer):
        return ("--merge-lora writes the merged parameters of a LoRA run (SRC OUT.npz or SRC --to-hf DIR); "
                "the adapters' AdamW moments (--optimizer) have no merged form")
    if args.from_hf and args.to_hf:
        return "--from-hf and --to-hf go one way each: give one of them"
    if args.from_hf:
        if len(paths) != 1:
            return "convert --from-hf DIR OUT: name one OUT folder (the run folder to write)"
        if args.hf or args.optimizer:
            return "--hf / --optimizer write .npz files; --from-hf writes a run folder"
    elif args.to_hf:
        if len(paths) != 1:
            return "convert RUN_DIR --to-hf DIR: name one run (or checkpoint) folder to export"
        if args.optimizer:
            return "--optimizer has no Hugging Face form: --to-hf writes the parameters only"
    elif len(paths) != 2:
        return ("convert SRC OUT.npz [--hf] [--optimizer], convert --from-hf DIR OUT or "
                "convert SRC --to-hf DIR")
    return None


def run(args) -> int:
    from . import hf
    problem = usage_problem(args)
    if problem:
        from .errors import ConfigError
        raise ConfigError([problem])
    if args.from_hf:
        path = hf.import_run(args.from_hf, args.paths[0], args.backend or "torch")
        print(f"[hvdllm] imported {args.from_hf} into {args.paths[0]} ({path.name}); next: "
              f"hvdllm generate {args.paths[0]}, or hvdllm train --set train.init_from={args.paths[0]}")
        return 0
    if args.to_hf:
        return to_hf(args.paths[0], args.to_hf, getattr(args, "merge_lora", False))
    args.src, args.out = args.paths
    return to_npz(args)


def merged(path, state, meta) -> dict:
    """--merge-lora: the LoRA run's adapters folded into its base (the run's train.init_from,
    read as the run read it)."""
    from . import config, hf, lora
    cfg = config.from_dict(meta.get("config") or {})
    if not lora.enabled(cfg):
        raise CheckpointError(f"{path}: not a LoRA run (its finetune.lora_rank is 0), so it has no adapters "
                              f"to merge; convert it without --merge-lora")
    # the exact base the run read (a run folder's newest checkpoint may have moved on since)
    src = hf.open_source(meta.get("lora_base") or cfg.train.init_from)
    base = hf.fit_vocab_tables(src.weights(), cfg.model)
    return lora.merge(base, state, cfg)


def to_hf(src, out_dir, merge_lora=False) -> int:
    """A run's newest intact checkpoint (or a checkpoint folder) as a Hugging Face folder."""
    from . import hf, tokenizer
    path = resolve(src)
    state, meta = checkpoint.load(path)
    params = merged(path, state, meta) if merge_lora else state
    config = meta.get("config") or {}
    model = dict(config.get("model") or {})
    if not model:
        raise CheckpointError(f"{path}: its manifest records no model config")
    if model.get("layers"):
        raise CheckpointError(f"{path}: a user's layer list (model.layers) has no Hugging Face form; "
                              f"--to-hf exports the built-in gpt2 and llama families")
    text = state.read_file(checkpoint.TOKENIZER_FILE) if hasattr(state, "read_file") else None
    text = text.decode("utf-8") if text is not None else None
    if text is None or json.loads(text).get("hvdllm_tokenizer") == "byte":
        text = tokenizer.byte_level_json()   # ids = UTF-8 bytes, as hvdllm's byte tokenizer
    source = state.read_file(hf.HF_CONFIG_FILE) if hasattr(state, "read_file") else None
    try:
        source = json.loads(source) if source is not None else None
    except ValueError:
        source = None
    out = hf.export(params, model, text, out_dir, float(model.get("dropout", 0.0)), source)
    print(f"[hvdllm] wrote {out}: {hf.CONFIG}, {hf.WEIGHTS}, {hf.TOKENIZER} from {path} (step "
          f"{meta.get('step')}); load with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def to_npz(args) -> int:
    src = resolve(args.src)
    state, meta = checkpoint.load(src)
    keep_all = getattr(args, "optimizer", False) and not args.hf
    params = {k: state[k] for k in state if keep_all or not k.startswith(("optim.", "localsgd."))}
    if getattr(args, "merge_lora", False):   # a plain model now: its config says so
        params = merged(src, state, meta)
        meta = {**meta, "config": {**meta["config"], "finetune": {**meta["config"]["finetune"],
                                                                   "lora_rank": 0, "lora_dropout": 0.0}}}
    if args.hf:   # hvdllm/hf.py's table: GPT-2 or Llama keys and orientation, the head spelled out
        from . import hf
        model = dict((meta.get("config") or {}).get("model") or {})
        if model.get("layers"):
            raise CheckpointError(f"{src}: a user's layer list (model.layers) has no Hugging Face names")
        params = hf.hf_tensors(params, model)
        if "lm_head.weight" not in params:   # tied: the head is the token embedding
            params["lm_head.weight"] = params[hf.specs(model)["wte"].parts[0].key]
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
