"""Hugging Face checkpoints in and out (hvdllm/hf.py), proved against transformers itself, offline:
transformers builds tiny random GPT-2 / Llama models and save_pretrained's them to a temp folder;
hvdllm imports them into torch and into TensorFlow (logits within 1e-5 relative of HF's own
forward, fp32), generates HF's greedy tokens, reads only the slices a tp rank holds, and exports
a run that `from_pretrained` loads with the same logits."""
import dataclasses
import json
from pathlib import Path

import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers  # the test extra (setup.cfg, scripts/bootstrap.sh)

import tf_backend
import torch_backend
from hvdllm import checkpoint, cli, config, hf, params, placement
from hvdllm.layout import Layout
from hvdllm.strategies import tensor_parallel as tp_plan

V, T = 320, 32
REL = 1e-5   # the bound: max |hvdllm - HF| / max |HF|, fp32
FAMILIES = ["gpt2", "llama", "llama-untied"]   # the imported models (llama-untied: its own lm_head)


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def make_tokenizer_json() -> str:
    """A byte-level BPE of V ids trained on hvdllm's own sources (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, show_progress=False, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.read_text() for p in sorted((Path(__file__).parents[2] / "hvdllm").glob("*.py"))]
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() <= V
    return tok.to_str()


def hf_model(family: str, seed: int = 0, tie: bool = True):
    """A tiny random transformers model with every parameter perturbed (biases and norm gains
    too, so a misplaced one shows), in eval mode."""
    torch.manual_seed(seed)
    if family == "gpt2":
        c = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(c)
    else:
        c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                     rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.float().eval()


def save_hf(model, folder: Path, tokenizer_text: str) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tokenizer_text)
    return folder


@pytest.fixture(scope="module")
def tokenizer_text():
    return make_tokenizer_json()


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory, tokenizer_text):
    """(family, HF model, HF folder, hvdllm run folder from `convert --from-hf`)."""
    family, tie = request.param.split("-")[0], not request.param.endswith("untied")
    tmp = tmp_path_factory.mktemp(f"hf-{request.param}")
    model = hf_model(family, tie=tie)
    folder = save_hf(model, tmp / "hf", tokenizer_text)
    run = tmp / "run"
    assert cli.main(["convert", "--from-hf", str(folder), str(run)]) == 0
    return family, model, folder, run


def run_cfg(run: Path, backend: str) -> config.Config:
    return config.load(run / "config.toml", ["parallel.dp=1", f'backend="{backend}"'])


def hvdllm_engine(backend: str, cfg: config.Config, state):
    layout = Layout.build(cfg.parallel, world_size=1, rank=0)
    mod = torch_backend if backend == "torch" else tf_backend
    engine = mod.Engine(cfg, layout)
    engine.load_state_dict(state)
    return engine


def logits_of(backend: str, engine, x: np.ndarray) -> np.ndarray:
    if backend == "torch":
        with torch.no_grad():
            return engine.model(torch.from_numpy(x)).numpy()
    return engine.model(tf.constant(x)).numpy()


def hf_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


def hf_greedy(model, prompt: list, n: int) -> list:
    """transformers' greedy continuation of n tokens (no end-of-text stop: hvdllm has none)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def batch(seed=0, b=3):
    return np.random.default_rng(seed).integers(0, V, (b, T))


# -- import ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_imported_logits_equal_hf(imported, backend):
    """convert --from-hf, then the run's checkpoint in either framework: HF's logits."""
    family, model, folder, run = imported
    state, _ = checkpoint.load(checkpoint.latest(run))
    engine = hvdllm_engine(backend, run_cfg(run, backend), state)
    x = batch()
    err = rel(logits_of(backend, engine, x), hf_logits(model, x))
    tie = "" if model.config.tie_word_embeddings else " untied"
    print(f"[{family}{tie} {backend}] max relative logit difference vs transformers: {err:.2e}")
    assert err <= REL


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_init_from_reads_the_hf_folder_directly(imported, backend):
    """train.init_from = DIR: the HF folder itself is the state (lazy HFWeights), same logits."""
    family, model, folder, run = imported
    cfg = config.load(None, [f"train.init_from={json.dumps(str(folder))}", f'backend="{backend}"'])
    src = hf.apply_init_from(cfg)
    assert cfg.model.n_embd == 32 and cfg.model.vocab_size == V and src.kind == "hf"
    engine = hvdllm_engine(backend, cfg, src.weights())
    x = batch(1)
    assert rel(logits_of(backend, engine, x), hf_logits(model, x)) <= REL


def test_init_from_the_imported_run(imported):
    """train.init_from = OUT (the run `convert --from-hf` wrote): its settings, its tokenizer
    (registered for the corpus), its weights without optimizer state."""
    family, model, folder, run = imported
    cfg = config.load(None, [f"train.init_from={json.dumps(str(run))}", "model.n_layer=7"])
    src = hf.apply_init_from(cfg)
    assert src.kind == "hvdllm" and cfg.model.n_layer == 2 and cfg.model.vocab_size == V
    config.validate(cfg, 1)
    hf.use_source_tokenizer(cfg, src)
    assert cfg.data.tokenizer.startswith("hf:") and hf.for_toml(cfg).data.tokenizer == "byte"
    from hvdllm.tokenizer import get_tokenizer
    assert get_tokenizer(cfg.data).encode("def f(): pass") == \
        checkpoint.stored_tokenizer(checkpoint.latest(run)).encode("def f(): pass")
    w = src.weights()
    assert not [k for k in w if k.startswith("optim.")]
    engine = hvdllm_engine("torch", cfg, w)
    x = batch(3)
    assert rel(logits_of("torch", engine, x), hf_logits(model, x)) <= REL


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_greedy_generation_equals_transformers(imported, backend):
    family, model, folder, run = imported
    state, _ = checkpoint.load(checkpoint.latest(run))
    engine = hvdllm_engine(backend, run_cfg(run, backend), state)
    tok = checkpoint.stored_tokenizer(checkpoint.latest(run))
    prompt = tok.encode("def main():\n    return ")
    n = 12
    ours = engine.generate(prompt, n, temperature=0.8, top_k=1, seed=0)
    theirs = hf_greedy(model, prompt, n)
    assert ours == theirs


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_cli_generate_greedy_is_transformers(imported, backend, capsys, monkeypatch):
    """`hvdllm generate OUT --top-k 1 [--backend tensorflow]` on the imported run, untrained."""
    from hvdllm import runtime
    monkeypatch.setattr(runtime, "_install_signal_handlers", lambda rt: None)   # pytest keeps its own
    family, model, folder, run = imported
    tok = checkpoint.stored_tokenizer(checkpoint.latest(run))
    text = "class Config:\n    "
    prompt = tok.encode(text)
    ids = hf_greedy(model, prompt, 10)
    capsys.readouterr()
    assert cli.main(["generate", str(run), "--prompt", text, "--top-k", "1", "--tokens", "10",
                     "--backend", backend]) == 0
    assert capsys.readouterr().out == text + tok.decode(ids) + "\n"


def test_sharded_index_and_bf16_checkpoints(tmp_path, tokenizer_text):
    """model.safetensors.index.json with several shards reads as the single file does; a bf16
    checkpoint reads as float32 (its exact values)."""
    model = hf_model("gpt2", seed=2)
    one = save_hf(model, tmp_path / "one", tokenizer_text)
    model.save_pretrained(tmp_path / "many", safe_serialization=True, max_shard_size="40KB")
    many = tmp_path / "many"
    assert (many / "model.safetensors.index.json").exists() and len(list(many.glob("*.safetensors"))) > 2
    settings = hf.model_settings(hf.read_hf_config(one))
    a, b = hf.HFWeights(one, settings), hf.HFWeights(many, settings)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    pl = tp_plan.placement("h.1.attn.c_attn.weight", 2, 2, 1)
    np.testing.assert_array_equal(b.slice("h.1.attn.c_attn.weight", pl), a.slice("h.1.attn.c_attn.weight", pl))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    c = hf.HFWeights(tmp_path / "bf16", settings)
    for name in a:
        want = torch.from_numpy(a[name]).to(torch.bfloat16).float().numpy()
        got = c[name]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_a_tp_rank_reads_only_its_slices(imported, monkeypatch):
    """Under tp=2 each rank's slice (fused qkv by heads, vocab rows, row-parallel inputs) is what
    cutting the whole array gives, and only that many elements are read from the file."""
    family, model, folder, run = imported
    src = hf.open_source(folder)
    w = src.weights()
    whole = {n: w[n] for n in w}
    read = []
    orig = hf._Files.read

    def counting(self, key, index):
        a = orig(self, key, index)
        read.append(a.size)
        return a
    monkeypatch.setattr(hf._Files, "read", counting)
    for rank in range(2):
        for name in w:
            pl = tp_plan.placement(name, len(w.shapes[name]), 2, rank)
            read.clear()
            got = w.slice(name, pl)
            want = placement.take(whole[name], pl)
            np.testing.assert_array_equal(got, want, err_msg=name)
            assert sum(read) == want.size, f"{name}: read {sum(read)} elements for a slice of {want.size}"


def test_imported_run_records_tokenizer_and_config(imported):
    family, model, folder, run = imported
    path = checkpoint.latest(run)
    state, meta = checkpoint.load(path)
    assert meta["step"] == 0 and meta["config"]["model"]["vocab_size"] == V
    assert json.loads(state.read_file(hf.HF_CONFIG_FILE))["model_type"] == family
    tok = checkpoint.stored_tokenizer(path)
    assert tok.vocab_size <= V and (run / "config.toml").exists()
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("import numpy as np\n") == ref.encode("import numpy as np\n").ids


# -- export ---------------------------------------------------------------------------------
def _native_run(tmp_path: Path, family: str, backend: str, tie: bool = True) -> tuple[Path, object]:
    """An hvdllm run of its own (random init, byte tokenizer) saved by `backend`'s engine."""
    sets = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", f"model.block_size={T}",
            f"model.vocab_size={V}", f'backend="{backend}"', "train.seed=7"]
    if family == "llama":
        sets += ['model.family="llama"', "model.n_kv_head=2", "model.ffn_hidden=80",
                 f"model.tie_embeddings={'true' if tie else 'false'}"]
    cfg = config.load(None, sets)
    layout = Layout.build(cfg.parallel, world_size=1, rank=0)
    engine = (torch_backend if backend == "torch" else tf_backend).Engine(cfg, layout)
    state = engine.state_dict()
    rng = np.random.default_rng(3)   # biases and gains away from 0 / 1
    state = {k: (v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)) if k in dict(engine.named) else v
             for k, v in state.items()}
    engine.load_state_dict(state)
    from hvdllm.tokenizer import ByteTokenizer
    meta = {"config": cfg.to_dict(), "layout": "dp=1", "backend": backend, "tokenizer": "byte",
            checkpoint.EXTRA_FILES: {checkpoint.TOKENIZER_FILE: ByteTokenizer().serialize()}}
    checkpoint.save(tmp_path / "run", 5, state, meta)
    return tmp_path / "run", engine


@pytest.mark.parametrize("family,backend", [("gpt2", "torch"), ("gpt2", "tensorflow"),
                                            ("llama", "torch"), ("llama", "tensorflow")])
def test_export_loads_in_transformers(tmp_path, family, backend):
    run, engine = _native_run(tmp_path, family, backend, tie=(backend == "torch"))
    out = tmp_path / "hf"
    assert cli.main(["convert", str(run), "--to-hf", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = batch(2)
    err = rel(hf_logits(model, x), logits_of(backend, engine, x))
    print(f"[{family} {backend}] export reload: max relative logit difference {err:.2e}")
    assert err <= REL
    # the byte tokenizer is exported as an equivalent tokenizer.json
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "héllo wörld\n\tdef f(): 1 "
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text


def test_import_export_round_trip_is_exact(imported, tmp_path):
    """HF -> hvdllm -> HF gives the same tensors and tokenizer."""
    family, model, folder, run = imported
    out = tmp_path / "back"
    assert cli.main(["convert", str(run), "--to-hf", str(out)]) == 0
    from safetensors.numpy import load_file
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(b) <= set(a)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((folder / "tokenizer.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):   # kept from the imported config.json
        assert exported[key] == getattr(model.config, key)
    # the one-file form (convert RUN model.npz --hf): the same tensors under the same keys, and
    # the head spelled out
    assert cli.main(["convert", str(run), str(tmp_path / "m.npz"), "--hf"]) == 0
    with np.load(tmp_path / "m.npz") as z:
        assert set(b) | {"lm_head.weight"} == set(z.files) - {"__meta__"}
        for k in b:
            np.testing.assert_array_equal(z[k], b[k], err_msg=k)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = batch(4)
    np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(model, x))


# -- a padded vocabulary (model.vocab_multiple) --------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_padded_vocabulary_is_the_unpadded_model(imported, backend, tmp_path):
    """model.vocab_multiple = 96 pads the 320-id tables to 384 rows (zeros from the HF folder):
    the real ids' logits, the loss, its gradient and greedy tokens are HF's, the padded ids'
    logits are masked, and an export drops the padding again."""
    family, model, folder, run = imported
    cfg = config.load(None, [f"train.init_from={json.dumps(str(folder))}", f'backend="{backend}"',
                             "model.vocab_multiple=96"])
    src = hf.apply_init_from(cfg)
    assert (cfg.model.vocab_multiple, params.table_vocab(cfg.model)) == (96, 384)
    weights = hf.fit_vocab_tables(src.weights(), cfg.model)
    assert weights.shapes["wte"] == (384, 32)
    engine = hvdllm_engine(backend, cfg, weights)
    x, y = batch(6), batch(7)
    ours, theirs = logits_of(backend, engine, x), hf_logits(model, x)
    assert ours.shape[-1] == 384 and np.all(ours[..., V:] <= -1e29)
    assert rel(ours[..., :V], theirs) <= REL
    t = torch.from_numpy(theirs).requires_grad_()
    hf_loss = torch.nn.functional.cross_entropy(t.reshape(-1, V), torch.from_numpy(y).reshape(-1))
    ev = engine.evaluate(x, y)
    assert abs(ev.loss_sum / ev.tokens - float(hf_loss)) <= 1e-5 * float(hf_loss)
    tok = checkpoint.stored_tokenizer(checkpoint.latest(run))
    prompt = tok.encode("def main():\n    return ")
    assert engine.generate(prompt, 8, top_k=1) == hf_greedy(model, prompt, 8)
    # a step: the padded rows get no gradient (the mask's softmax weight is exactly 0) ...
    before = engine.state_dict()
    engine.train_step(x, y, lr=1e-3)
    after = engine.state_dict()
    head = params.head_name(cfg.model)
    np.testing.assert_array_equal(after[f"optim.m.{head}"][V:], 0.0)
    assert not np.array_equal(after[head][:V], before[head][:V])
    # ... and the export is HF-shaped
    tensors = hf.hf_tensors(after, dataclasses.asdict(cfg.model))
    assert {a.shape[0] for k, a in tensors.items() if "wte" in k or "embed" in k or "lm_head" in k} == {V}


def test_a_tp_rank_reads_only_its_padded_rows(imported, monkeypatch):
    """Padded to 384 rows at tp=2, rank 1 holds rows 192..383: it reads the file's rows 192..319
    alone, and the rest of its slice is zeros."""
    family, model, folder, run = imported
    w = hf.fit_vocab_tables(hf.open_source(folder).weights(), config.load(None, [f"model.vocab_size={V}",
                                                                                 "model.vocab_multiple=96"]).model)
    read = []
    orig = hf._Files.read
    monkeypatch.setattr(hf._Files, "read", lambda self, key, index: read.append(orig(self, key, index)) or read[-1])
    for name in w.tables:
        whole = w[name]
        assert whole.shape[0] == 384 and not whole[V:].any()
        for rank in range(2):
            pl = tp_plan.placement(name, 2, 2, rank)
            read.clear()
            np.testing.assert_array_equal(w.slice(name, pl), placement.take(whole, pl), err_msg=name)
            assert sum(a.shape[0] for a in read) == (192 if rank == 0 else V - 192), name


def test_tp_that_does_not_divide_the_vocabulary_says_pad_it():
    bad = config.load(None, ["model.vocab_size=50257", "parallel.tp=4", "model.n_head=4"])
    with pytest.raises(config.ConfigError, match="set model.vocab_multiple to a multiple of 4"):
        config.validate(bad, 4)
    ok = config.load(None, ["model.vocab_size=50257", "parallel.tp=4", "model.n_head=4",
                            "model.vocab_multiple=128"])
    config.validate(ok, 4)
    assert params.table_vocab(ok.model) == 50304


# -- refusals: one message, exit 2 for usage, nothing written -----------------------------------
def test_convert_usage_and_bad_folders(tmp_path, capsys):
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nope")]) == 2
    assert "OUT" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bad / "model.safetensors").write_bytes(b"")
    assert cli.main(["convert", "--from-hf", str(bad), str(tmp_path / "out")]) == 1
    assert "model_type 'bert' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "nope"), "--to-hf", str(tmp_path / "x"), "--optimizer"]) == 2
    assert "--optimizer has no Hugging Face form" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "nope"), "--to-hf", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_from_missing_folder_is_a_config_error(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--set", f"train.init_from={json.dumps(str(tmp_path / 'missing'))}",
                     "--set", f"train.out_dir={json.dumps(str(out))}"])
    assert code == 2
    assert "train.init_from:" in capsys.readouterr().err
    assert not out.exists()


def test_init_from_brings_its_tokenizer(imported):
    family, model, folder, run = imported
    cfg = config.load(None, [f"train.init_from={json.dumps(str(folder))}", 'data.tokenizer="bpe"'])
    with pytest.raises(config.ConfigError, match="data.tokenizer: train.init_from brings"):
        hf.apply_init_from(cfg)
