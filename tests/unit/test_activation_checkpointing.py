"""train.activation_checkpointing recomputes instead of keeping, and changes nothing else: 'full'
(each block) and 'selective' (each attention core) give the losses, gradient norms (clipping
binding) and weights of 'none', for both families and both frameworks, in one process; torch's
saved activations, counted as autograd saves them, fall. Under tp=2 and pp=2:
tests/integration/test_llama_layouts.py's launch."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
import torch

import tf_backend
import torch_backend
from hvdllm import config
from hvdllm.layout import Layout

V, T, B, STEPS = 256, 32, 4, 2   # V: the byte tokenizer's (validation requires it)
MODES = ("full", "selective")


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def make_cfg(family: str, backend: str, mode: str, **extra):
    sets = ["model.n_layer=3", "model.n_embd=32", "model.n_head=4", f"model.block_size={T}",
            f"model.vocab_size={V}", f'backend="{backend}"', f'train.activation_checkpointing="{mode}"',
            "optim.grad_clip=0.05", "optim.warmup_steps=0", "optim.lr=3e-3", "train.seed=5"]
    if family == "llama":
        sets += ['model.family="llama"', "model.n_kv_head=2", "model.ffn_hidden=48"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return config.validate(config.load(None, sets))


def trajectory(family, backend, mode, **extra):
    cfg = make_cfg(family, backend, mode, **extra)
    engine = (torch_backend if backend == "torch" else tf_backend).Engine(cfg, Layout.build(cfg.parallel, 1, 0))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        r = engine.train_step(x, y, lr=3e-3)
        out.append((r.loss, r.grad_norm))
    return np.array(out), {k: v for k, v in engine.state_dict().items() if not k.startswith("optim.")}


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recomputation_changes_no_number(family, backend):
    ref, ref_w = trajectory(family, backend, "none")
    assert np.all(ref[:, 1] > 0.05), "the clip must bind for the test to cover it"
    for mode in MODES:
        got, w = trajectory(family, backend, mode)
        np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=f"{family} {backend} {mode}")
        for k in ref_w:   # atol: where a gradient is ~0, AdamW's m / sqrt(v) magnifies float32 rounding
            np.testing.assert_allclose(w[k], ref_w[k], rtol=1e-5, atol=1e-6, err_msg=f"{mode} {k}")


def saved_bytes(mode: str, dropout: float = 0.0) -> int:
    """Bytes autograd keeps for backward during one training forward of the torch GPT."""
    cfg = make_cfg("gpt2", "torch", mode, model__dropout=dropout)
    from torch_backend.model import GPT
    model = GPT(cfg.model, 0)
    model.checkpointing = mode
    model.train()
    total = [0]
    seen = set()

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)   # a tensor saved twice is held once
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t
    x = torch.randint(0, V, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x, torch.randint(0, V, (B, T)))
    loss.backward()
    return total[0]


def test_full_recomputation_keeps_less():
    none, full, selective = (saved_bytes(m) for m in ("none", "full", "selective"))
    print(f"saved activations (bytes): none {none}, selective {selective}, full {full}")
    assert full * 2 <= none
    assert selective < none


def test_torch_dropout_masks_are_redrawn_alike():
    """With dropout, recomputation restores torch's RNG state: the same gradients."""
    grads = {}
    for mode in ("none", "full"):
        cfg = make_cfg("gpt2", "torch", mode, model__dropout=0.2)
        from torch_backend.model import GPT
        model = GPT(cfg.model, 0)
        model.checkpointing = mode
        model.train()
        torch.manual_seed(3)
        rng = np.random.default_rng(1)
        x, y = (torch.from_numpy(rng.integers(0, V, (B, T))) for _ in range(2))
        model.loss(x, y).backward()
        grads[mode] = torch.cat([p.grad.reshape(-1) for _, p in model.named()])
    torch.testing.assert_close(grads["full"], grads["none"], rtol=1e-6, atol=1e-8)


def test_bad_settings_name_the_key():
    with pytest.raises(config.ConfigError, match="train.activation_checkpointing: must be"):
        make_cfg("gpt2", "torch", "some")
    with pytest.raises(config.ConfigError, match="new dropout masks"):
        make_cfg("gpt2", "tensorflow", "full", model__dropout=0.1)
