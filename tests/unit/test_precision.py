"""train.precision = 'bf16' / 'fp16': matmuls and attention in 16 bits (torch.autocast; TF's casts),
float32 masters; fp16 with dynamic loss scaling (hvdllm/loss_scale.py). In one process, both
frameworks: bf16 does change the numbers (it is really used), stays within bfloat16's rounding of
float32 at the first step, and after 120 steps of learning a pattern (the loss falls to a fraction
of its start) its loss is within 2% of the starting loss of float32's: the two trajectories part
(chaotically, as any two roundings do) but learn alike. fp16 skips an overflowing step. np=2 equal
to np=1 in bf16 and fp16 (dp, ZeRO-1, tp, pp; an overflow on one rank skipped on every rank, the
scale np=1's), and 200 bf16 steps at each layout learning as fp32 does:
tests/integration/test_llama_layouts.py's launch; ZeRO-1's scaled step and skip on simulated
ranks: tests/unit/test_zero1_sim.py."""
from pathlib import Path

import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import launch_util
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


def engine(family, backend, precision, zero=0, *extra):
    sets = [*extra, f"parallel.zero={zero}", "model.n_layer=2", "model.n_embd=32", "model.n_head=4",
            f"model.block_size={T}", f"model.vocab_size={V}", f'backend="{backend}"', f'train.precision="{precision}"',
            "optim.warmup_steps=0", "train.seed=3", "train.threads=1"]
    if family == "llama":
        sets += ['model.family="llama"', "model.n_kv_head=2", "model.ffn_hidden=48"]
    cfg = config.validate(config.load(None, sets))
    be = torch_backend if backend == "torch" else tf_backend
    layout = Layout.build(cfg.parallel, 1, 0)
    if cfg.model.layers:   # a user's layer list: its engines take the runtime (one process here)
        from mpi4py import MPI

        from hvdllm.runtime import Runtime
        rt = Runtime("single", 0, 1, 0, 1, MPI.COMM_WORLD, {})
        return (be.ShardedSequentialEngine if zero >= 2 else be.SequentialEngine)(cfg, layout, rt)
    return (be.ShardedEngine if zero >= 2 else be.Engine)(cfg, layout)


MODELS = Path(__file__).resolve().parents[1] / "user_models.py"
USER_LM = {"torch": f"{MODELS}:torch_lm", "tensorflow": f"{MODELS}:keras_lm"}


def pattern_batches(n):
    return launch_util.pattern_batches(n, B, T)


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


@pytest.mark.parametrize("backend,zero,layers", [(b, z, False) for b in ("torch", "tensorflow") for z in (0, 2, 3)]
                         + [(b, z, True) for b in ("torch", "tensorflow") for z in (0, 3)])
def test_fp16_skips_an_overflowing_step_and_halves_the_scale(backend, zero, layers):
    """An overflow (the testing aid's infinite scale at step 3) leaves every weight and AdamW's
    step count as they were, halves the scale, and the run goes on; fp16 trains within its
    rounding of float32 (11 significant bits). ZeRO-2/3 (strategies/zero_sharded.py: ZeRO-3's
    weights live in its shards) alike, on the sharded engines' own loss-scaled backward; and a
    user's layer list (model.layers: torch autocast / Keras' mixed_float16 policy), unsharded and
    under ZeRO-3 (its units are the layers)."""
    extra = [f'model.layers="{USER_LM[backend]}"'] if layers else []
    e, ref = engine("gpt2", backend, "fp16", zero, *extra), engine("gpt2", backend, "fp32", zero, *extra)
    batches = list(pattern_batches(6))
    first = e.train_step(*batches[0], lr=3e-3)
    want = ref.train_step(*batches[0], lr=3e-3)
    assert first.loss != want.loss and abs(first.loss - want.loss) <= 4 * 2.0 ** -11 * want.loss
    assert abs(first.grad_norm - want.grad_norm) <= 0.02 * want.grad_norm   # the unscaled norm
    e.train_step(*batches[1], lr=3e-3)
    before, scale = e.state_dict(), e.scaler.scale
    e.inject_overflow = True
    r = e.train_step(*batches[2], lr=3e-3)
    assert r.skipped and not np.isfinite(r.grad_norm) and e.scaler.scale == scale / 2
    after = e.state_dict()
    assert after["optim.step"] == before["optim.step"] == 2
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    r = e.train_step(*batches[3], lr=3e-3)
    assert not r.skipped and np.isfinite(r.loss) and e.state_dict()["optim.step"] == 3


@pytest.mark.parametrize("backend,zero", [(b, z) for b in ("torch", "tensorflow") for z in (0, 3)])
def test_bf16_over_a_layer_list_is_really_used(backend, zero):
    """train.precision = 'bf16' over a user's layer list computes in bfloat16 (torch autocast /
    Keras' mixed_bfloat16; before, the list silently ran in float32): the first step's loss
    differs from float32's, within bfloat16's rounding, and the unscaled norm is float32's to 2%;
    no loss scaler."""
    extra = [f'model.layers="{USER_LM[backend]}"']
    e, ref = engine("gpt2", backend, "bf16", zero, *extra), engine("gpt2", backend, "fp32", zero, *extra)
    assert e.scaler is None
    batch = next(iter(pattern_batches(1)))
    got, want = e.train_step(*batch, lr=3e-3), ref.train_step(*batch, lr=3e-3)
    assert got.loss != want.loss and abs(got.loss - want.loss) <= 4 * BF16_EPS * want.loss, (got.loss, want.loss)
    assert abs(got.grad_norm - want.grad_norm) <= 0.02 * want.grad_norm


def test_loss_scaler_rules():
    from hvdllm.loss_scale import LossScaler
    s = LossScaler(init=8.0, window=2)
    s.update(True)
    assert (s.scale, s.good) == (8.0, 1)
    s.update(True)
    assert (s.scale, s.good) == (16.0, 0)    # doubles after `window` finite steps
    s.update(False)
    assert (s.scale, s.good) == (8.0, 0)     # halves on an overflow
    t = LossScaler()
    t.load(s.state())
    assert t.state() == s.state()


def test_precision_is_validated():
    with pytest.raises(config.ConfigError, match="train.precision"):
        config.validate(config.load(None, ['train.precision="fp8"']))
    # fp16 runs under dp, tp, pp and ZeRO-1/2/3 (the overflow check is the job-wide gradient
    # norm), over a user's layer list, with local SGD and with parameter servers
    for ok in (["parallel.pp=2"], ["parallel.zero=1"], ["parallel.pp=2", "parallel.zero=1"], ["parallel.tp=2"],
               ["parallel.zero=2"], ["parallel.zero=3"], ["parallel.pp=2", "parallel.zero=3"],
               [f'model.layers="{USER_LM["torch"]}"', "parallel.pp=2"],
               [f'model.layers="{USER_LM["tensorflow"]}"', 'backend="tensorflow"', "parallel.zero=3"]):
        config.validate(config.load(None, ['train.precision="fp16"', *ok]))
    config.validate(config.load(None, ['train.precision="fp16"', "localsgd.every=4"]))   # each rank skips alone
    for low in ("fp16", "bf16"):   # over a list beside tp: not yet (Horovod's CPU ops take no bfloat16)
        with pytest.raises(config.ConfigError, match=f"'{low}' over model.layers .* not yet beside parallel.tp = 2"):
            config.validate(config.load(None, [f'train.precision="{low}"', f'model.layers="{USER_LM["torch"]}"',
                                               "parallel.tp=2", "model.tp_plan=*.fc=column"]), 2)
    for mode in ("sync", "async"):   # the workers unscale, the servers skip an overflowed push
        config.validate(config.load(None, ['train.precision="fp16"', "ps.servers=1", f"ps.mode={mode}"]), 3)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fp16_local_sgd_skips_an_overflow_on_its_own_rank_only(backend):
    """Local SGD (localsgd.every = 2) on 2 simulated ranks (tests/unit/simcoll.py), each a real
    engine: rank 1's gradients overflow at step 2. Between averages a rank steps alone, so only
    rank 1 skips: its AdamW step count stays 1 and its scale halves, rank 0 takes its step at its
    scale; no message is added (per step the loss's, per average the parameters': a job-wide skip
    would cost an allreduce every step, which local SGD exists to save). The average at step 2 is
    the mean of two single-process fp16 runs on each rank's data, rank 1's with that step
    skipped."""
    from simcoll import World
    from simcoll import backend as sim_backend
    be = torch_backend if backend == "torch" else tf_backend
    sets = ["localsgd.every=2", "model.dropout=0", "model.n_layer=2", "model.n_embd=32", "model.n_head=4",
            f"model.block_size={T}", f"model.vocab_size={V}", f'backend="{backend}"', 'train.precision="fp16"',
            "optim.warmup_steps=0", "train.seed=3", "train.threads=1", "train.steps=4"]
    cfg = config.validate(config.load(None, sets))
    data = [list(launch_util.pattern_batches(2, B, T))[::-1], list(pattern_batches(2))]   # rank r's batches

    def run(r, comm=None, local=True):
        c = cfg if local else config.validate(config.load(None, sets[1:] + ["localsgd.every=0"]))
        e = be.Engine(c, Layout.build(c.parallel, 2 if local else 1, r if local else 0), collectives=comm)
        out = []
        for step, (x, y) in enumerate(data[r], 1):
            e.inject_overflow = r == 1 and step == 2
            out.append(e.train_step(x, y, lr=3e-3).skipped)
        return out, e.scaler.scale, int(e.state_dict()["optim.step"]), to_np(e.device_flat_params())

    world = World(2, timeout=60.0)
    comms = sim_backend(backend).group(world)
    (skip0, scale0, t0, p0), (skip1, scale1, t1, p1) = world.run(lambda r: run(r, comms[r]))
    assert (skip0, skip1) == ([False, False], [False, True])
    assert (t0, t1) == (2, 1) and scale1 == scale0 / 2 == 2.0 ** 15
    np.testing.assert_array_equal(p0, p1)   # averaged at step 2
    refs = [run(r, local=False) for r in (0, 1)]
    assert [r[0] for r in refs] == [skip0, skip1]
    np.testing.assert_allclose(p0, (refs[0][3] + refs[1][3]) / np.float32(2), rtol=1e-6, atol=1e-7)
    assert {n for _, n in world.groups[0].log} == {"init.params", "loss", "localsgd.params"}


def to_np(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t.numpy(), np.float32)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fp16_local_gradients_carry_the_loss_scale(backend):
    """What a parameter-server worker pushes from (Engine.local_gradients, no communication):
    under fp16 the gradient times this step's loss scale, which the worker divides out
    (strategies/ps_worker.py), within fp16's rounding of float32's; the testing aid's overflow
    makes it non-finite, which the worker turns into a skipped push."""
    e, ref = engine("gpt2", backend, "fp16"), engine("gpt2", backend, "fp32")
    (x, y), = pattern_batches(1)
    loss, g = e.local_gradients(x, y)
    want_loss, want = ref.local_gradients(x, y)
    assert e.scale == e.scaler.scale == 2.0 ** 16
    g = np.asarray(g, np.float64) / e.scale
    assert abs(loss - want_loss) <= 4 * 2.0 ** -11 * want_loss
    assert np.linalg.norm(g - want) <= 0.02 * np.linalg.norm(want)
    e.inject_overflow = True
    assert not np.isfinite(e.local_gradients(x, y)[1]).all()
