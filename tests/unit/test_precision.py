"""train.precision = 'bf16': matmuls and attention in bfloat16 (torch.autocast; TF's casts), float32
masters. In one process, both frameworks, both families: it does change the numbers (bf16 is
really used), stays within bfloat16's rounding of float32 at the first step, and after 120 steps
of learning a pattern (the loss falls to a fraction of its start) its loss is within 2% of the
starting loss of float32's: the two trajectories part (chaotically, as any two roundings do) but
learn alike. np=2 equal to np=1 under bf16 (dp and
tp): tests/integration/test_llama_layouts.py's launch."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest

import tf_backend
import torch_backend
from hvdllm import config
from hvdllm.layout import Layout

V, T, B = 256, 32, 8   # V: the byte tokenizer's (validation requires it)
STEPS = 120
BF16_EPS = 2.0 ** -8   # bfloat16 keeps 8 significant bits


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def engine(family, backend, precision):
    sets = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", f"model.block_size={T}",
            f"model.vocab_size={V}", f'backend="{backend}"', f'train.precision="{precision}"',
            "optim.warmup_steps=0", "train.seed=3", "train.threads=1"]
    if family == "llama":
        sets += ['model.family="llama"', "model.n_kv_head=2", "model.ffn_hidden=48"]
    cfg = config.validate(config.load(None, sets))
    return (torch_backend if backend == "torch" else tf_backend).Engine(cfg, Layout.build(cfg.parallel, 1, 0))


def pattern_batches(n):
    """Sequences that count up by a per-sequence stride mod 16: learnable in a few hundred steps."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        start, stride = rng.integers(0, 16, (B, 1)), rng.integers(1, 4, (B, 1))
        seq = (start + stride * np.arange(T + 1)) % 16 + 65
        yield seq[:, :-1], seq[:, 1:]


# bf16 is family-agnostic in each backend (torch: autocast over every layer; TF: every matmul):
# one family per framework, crossed
@pytest.mark.parametrize("family,backend", [("gpt2", "torch"), ("llama", "tensorflow")])
def test_bf16_trains_as_float32_does_within_its_rounding(family, backend):
    runs = {}
    for precision in ("fp32", "bf16"):
        e = engine(family, backend, precision)
        runs[precision] = [e.train_step(x, y, lr=3e-3) for x, y in pattern_batches(STEPS)]
    first32, first16 = runs["fp32"][0], runs["bf16"][0]
    assert first16.loss != first32.loss, "bf16 gave float32's bits: it was not used"
    assert abs(first16.loss - first32.loss) <= 4 * BF16_EPS * first32.loss
    assert abs(first16.grad_norm - first32.grad_norm) <= 0.1 * first32.grad_norm
    end32 = np.mean([r.loss for r in runs["fp32"][-10:]])
    end16 = np.mean([r.loss for r in runs["bf16"][-10:]])
    print(f"{family} {backend}: loss {first32.loss:.4f} -> {end32:.4f} (fp32), {end16:.4f} (bf16)")
    assert end32 < 0.5 * first32.loss, "the pattern was not learned: the comparison means nothing"
    assert abs(end16 - end32) <= 0.02 * first32.loss


def test_precision_is_validated():
    with pytest.raises(config.ConfigError, match="train.precision"):
        config.validate(config.load(None, ['train.precision="fp8"']))
