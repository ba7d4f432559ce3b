"""Issue 15 at the integration tier, in one launch: a tiny random transformers Llama (grouped-query
attention, untied head) is fine-tuned 20 steps at dp2 x tp2 straight from its Hugging Face folder
(train.init_from: each rank reads only its tp slices, key/value heads split), exported with
`convert --to-hf`, reloaded by transformers' from_pretrained, and its logits compared with
hvdllm's own from the final checkpoint. The run pads the vocabulary (model.vocab_multiple): the
padded rows are zeros from the folder, masked in the vocab-parallel loss, dropped on export.
(GPT-2's fused-qkv slices: tests/unit/test_hf_import.py.)"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers  # the test extra (setup.cfg, scripts/bootstrap.sh)
from launch_util import hvdllm, losses

from hvdllm import checkpoint, cli, config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_hf_import import T, V, batch, hf_logits, hf_model, make_tokenizer_json, rel, save_hf  # noqa: E402


def hvdllm_logits(run: Path, x: np.ndarray) -> np.ndarray:
    """The run's newest checkpoint in hvdllm's torch model (one process, no collectives)."""
    import torch

    from torch_backend.model import GPT
    state, meta = checkpoint.load(checkpoint.latest(run))
    cfg = config.from_dict(meta["config"])
    model = GPT(cfg.model, 0)
    with torch.no_grad():
        for name, p in model.named():
            p.copy_(torch.from_numpy(np.asarray(state[name], np.float32)))
        return model(torch.from_numpy(x)).numpy()[..., :cfg.model.vocab_size]   # padding dropped


@pytest.mark.integration
def test_llama_import_finetune_dp2xtp2_export_reload(tmp_path):
    import torch
    tok_text = make_tokenizer_json()
    model = hf_model("llama", seed=1, tie=False)
    folder = save_hf(model, tmp_path / "hf", tok_text)
    run = tmp_path / "run"
    sets = [f"train.init_from={json.dumps(str(folder))}", f"train.out_dir={json.dumps(str(run))}",
            "parallel.tp=2", "train.batch_size=4", "train.steps=20", "train.eval_every=0",
            "train.eval_batches=2", "train.checkpoint_every=20", "train.threads=1", "train.sample_tokens=8",
            "train.progress=false", "optim.warmup_steps=2", "optim.lr=1e-3", "data.max_bytes=400000",
            "model.block_size=16",   # a llama's context is the run's choice, up to max_position_embeddings
            "model.vocab_multiple=96"]   # the 320-id tables padded to 384 rows: tp rank 1's has 64 masked
    r = hvdllm(4, ["train", *[a for kv in sets for a in ("--set", kv)]], timeout=400)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "initialised from" in r.stdout
    # the model's settings and tokenizer were used, its BPE stored
    cfg = config.load(run / "config.toml")
    assert (cfg.model.family, cfg.model.n_kv_head, cfg.model.tie_embeddings) == ("llama", 2, False)
    assert (cfg.model.n_embd, cfg.model.vocab_size, cfg.model.block_size, cfg.model.vocab_multiple) == (32, V, 16, 96)
    assert cfg.data.tokenizer == "byte" and cfg.train.init_from == str(folder)   # re-runnable as written
    stored = checkpoint.stored_tokenizer(checkpoint.latest(run))
    assert json.loads(stored.serialize()) == json.loads(tok_text)
    loss = losses(run)
    assert len(loss) == 20 and loss[-1] < loss[0]
    state, meta = checkpoint.load(checkpoint.latest(run))
    assert meta["step"] == 20 and "tp=2" in meta["layout"] and len(meta["shards"]) == 2
    # export, reload in transformers, same logits as hvdllm's
    out = tmp_path / "export"
    assert cli.main(["convert", str(run), "--to-hf", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    # the imported model's context length and special ids survive the fine-tune (hf_config.json)
    assert exported["max_position_embeddings"] == T and exported["eos_token_id"] == model.config.eos_token_id
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = batch(5)[:, :16]
    ours = hvdllm_logits(run, x)
    err = rel(hf_logits(reloaded, x), ours)
    print(f"dp2xtp2 fine-tune -> export -> transformers: max relative logit difference {err:.2e}")
    assert err <= 1e-5
    # and it did move away from the imported model
    assert rel(hf_logits(model, x), ours) > 1e-3
    with torch.no_grad():
        assert not torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
