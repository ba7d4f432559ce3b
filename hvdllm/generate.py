"""`hvdllm generate OUT_DIR`: sample from a run's newest intact checkpoint, with either framework."""
from __future__ import annotations

import sys

from . import backends, config, lora, task

# What a checkpoint's weights mean: `generate` refuses an out_dir/config.toml that disagrees with
# the checkpoint's own record of these (e.g. a later run in the same out_dir changed them).
GENERATE_CHECKED = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
                    "model.vocab_size", "model.layers", "model.family", "model.n_kv_head",
                    "model.ffn_hidden", "model.norm_eps", "model.rope_theta", "model.tie_embeddings",
                    "model.vocab_multiple")


def generate_inputs(args):
    """(cfg, checkpoint path, state, meta, tokenizer) for `hvdllm generate`, every check done
    before a framework starts: the newest intact checkpoint, a config.toml that agrees with it,
    the tokenizer stored with it (no corpus needed) and parameter shapes that fit the model."""
    from pathlib import Path

    from . import checkpoint, data
    from .errors import CheckpointError
    from .params import param_shapes
    out = Path(args.out_dir)
    path = checkpoint.latest(out)   # a damaged checkpoint is skipped, with a message
    if path is None:
        raise CheckpointError(f"no checkpoint in {out / 'checkpoints'}: pass the train.out_dir of a "
                              f"run that wrote one")
    state, meta = checkpoint.load(path)
    # one process holds the whole model, whatever layout trained it
    sets = ["parallel.dp=1", "parallel.pp=1", "parallel.tp=1"] + ([f'backend="{args.backend}"'] if args.backend else [])
    cfg_path = out / "config.toml"
    if cfg_path.exists():
        cfg = config.load(cfg_path, sets)
        diff = checkpoint.setting_differences(meta, cfg, GENERATE_CHECKED)
        if diff:
            raise CheckpointError(
                f"{cfg_path} does not describe the checkpoint {path}: " + "; ".join(
                    f"{k} is {b!r} there but {a!r} in the checkpoint" for k, a, b in diff) +
                f". A later run in this out_dir changed the config: restore those settings in {cfg_path}")
    elif meta.get("config"):
        cfg = config.from_dict(meta["config"], sets)
    else:
        raise CheckpointError(f"{cfg_path} not found: pass the train.out_dir of a finished run")
    tok = checkpoint.stored_tokenizer(path)
    if tok is None:   # a checkpoint from before tokenizers were stored with it: rebuild from the corpus
        print(f"[hvdllm] {path} holds no tokenizer (written by an older hvdllm): preparing it from "
              f"data.corpus", file=sys.stderr)
        tok = data.prepare(cfg.data, 0, comm=None).tokenizer
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"checkpoint {path}: its tokenizer ({tok.name}) has {tok.vocab_size} ids, "
                              f"more than model.vocab_size={cfg.model.vocab_size}")
    if lora.enabled(cfg):   # a LoRA run's checkpoint holds its adapters: merged into its base, a plain model
        import dataclasses

        from .convert import merged
        state = merged(path, state, meta)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lora_rank=0, lora_dropout=0.0))
    if not cfg.model.layers:
        checkpoint.check_compatible(state, param_shapes(task.model_config(cfg)), path)   # a classifier's too
    return cfg, path, state, meta, tok


def run(args) -> int:
    """Sample from a run's newest intact checkpoint, with either framework."""
    from . import runtime
    from .parallelize import build_solo_engine
    cfg, path, state, meta, tok = generate_inputs(args)
    if task.is_classify(cfg):
        from .errors import HvdllmError
        raise HvdllmError(f"{args.out_dir} holds a classifier (task.kind = 'classify'), which has no "
                          f"language-model output to sample from: use hvdllm predict {args.out_dir} --input FILE")
    backend = backends.load(cfg.backend)
    rt = runtime.start(backend)
    engine = build_solo_engine(cfg, rt, backend)
    engine.load_state_dict(state)
    ids = engine.generate(tok.encode(args.prompt), args.tokens, args.temperature, args.top_k, args.seed)
    if rt.rank == 0:
        print(f"[hvdllm] {cfg.backend} sampling from {path} (trained with {meta.get('backend')})",
              file=sys.stderr)
        print(args.prompt + tok.decode(ids))
    return 0
