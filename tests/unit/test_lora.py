"""LoRA (finetune.lora_rank, hvdllm/lora.py) in both frameworks, one CPU process (each with a
one-rank Horovod): only the adapters (and a classifier's head) train, so the base is
bit-identical after training; torch and TensorFlow take the same steps; ZeRO-1 takes the plain
optimizer's; the merged model's logits are the LoRA model's; a resume from a checkpoint of the
adapters continues the uninterrupted run exactly; validation names what to fix. finetune.lora_dropout:
the training steps change, reproducibly, evaluation and the merged model do not; the unfolded path
equals the folded one; ZeRO-2/3 and recomputation see the forward's masks. (np=2 equals
np=1 under dp and ZeRO-1: tests/integration/test_classify.py's one launch.)"""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
import tensorflow as tf
import torch

import tf_backend
import torch_backend
from hvdllm import config, lora, params, task
from hvdllm.config import Config
from hvdllm.errors import ConfigError
from hvdllm.layout import Layout

V, T, C = 64, 12, 32
BACKENDS = {"torch": torch_backend, "tensorflow": tf_backend}


@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)


def cfg(family="gpt2", targets=(), zero=0, classify=False, drop=0.0) -> Config:
    c = Config()
    c.finetune.lora_dropout = drop
    m = c.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.family = 2, C, 4, T, V, family
    c.finetune.lora_rank, c.finetune.lora_alpha, c.finetune.lora_targets = 4, 8.0, list(targets)
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = 1e-2, 0, 0.05   # clipping acts
    c.parallel.zero, c.train.init_from = zero, "base"
    if classify:
        c.task.kind, c.task.num_labels, c.task.labels = "classify", 3, ["a", "b", "c"]
    return c


def base(c) -> dict:
    """train.init_from's weights: a model other than the seeded one (seed 7)."""
    return params.init_params(task.model_config(c), 7)


def engine(c, be="torch"):
    make = BACKENDS[be].ShardedEngine if c.parallel.zero >= 2 else BACKENDS[be].Engine
    e = make(c, Layout.build(c.parallel, world_size=1, rank=0))
    e.load_state_dict(base(c))   # as the trainer's train.init_from does
    return e


def batch(step, c):
    rng = np.random.default_rng(step)
    x = rng.integers(1, V, (4, T))
    if task.is_classify(c):
        return x, np.stack([rng.integers(0, 3, 4), rng.integers(1, T + 1, 4)], 1)
    return x, rng.integers(0, V, (4, T))


def train(e, c, steps, start=0):
    return np.array([(r.loss, r.grad_norm) for r in
                     (e.train_step(*batch(s, c), 1e-2) for s in range(start, start + steps))])


def base_now(e) -> dict:
    return {n: np.array(e.to_host(p)) for n, p in e.base_named}


def logits(e, x):
    if isinstance(e.model, torch.nn.Module):
        with torch.no_grad():
            e.model.eval()
            return e.model(torch.from_numpy(x)).double().numpy()
    return e.model(tf.constant(x), training=False).numpy().astype(np.float64)


def test_targets_defaults_and_validation():
    assert lora.targets(cfg()) == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    assert lora.targets(cfg("llama")) == ["h.0.attn.q.weight", "h.0.attn.v.weight",
                                          "h.1.attn.q.weight", "h.1.attn.v.weight"]
    assert lora.targets(cfg(targets=["mlp.*", "h.1.attn.c_proj"])) == [
        "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "h.1.attn.c_proj.weight",
        "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight"]
    assert lora.trainable_shapes(cfg(classify=True)) == {
        "h.0.attn.c_attn.lora_A": (4, C), "h.0.attn.c_attn.lora_B": (3 * C, 4),
        "h.1.attn.c_attn.lora_A": (4, C), "h.1.attn.c_attn.lora_B": (3 * C, 4),
        "cls.weight": (C, 3), "cls.bias": (3,)}
    ok = cfg()
    ok.model.vocab_size = 256   # the byte tokenizer's, which validation asks for
    config.validate(ok)
    bad = cfg(targets=["attn.q_proj", "c_attn"])
    bad.model.vocab_size = 256
    with pytest.raises(ConfigError) as e:
        config.validate(bad)
    msg = str(e.value)
    assert "'attn.q_proj' match no linear weight" in msg and "attn.c_attn" in msg and "mlp.c_fc" in msg
    refused = cfg(zero=2)
    refused.parallel.tp, refused.train.init_from = 2, ""
    with pytest.raises(ConfigError) as e:
        config.validate(refused)
    msg = str(e.value)
    assert "parallel.tp: not combinable with finetune.lora_rank" in msg
    assert "parallel.zero:" not in msg and "train.init_from: LoRA adapts" in msg   # ZeRO-2/3 are accepted


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_adapters_train_and_backends_agree(family):
    c = cfg(family, classify=family == "llama")
    runs = {}
    for be in BACKENDS:
        e = engine(c, be)
        before = base_now(e)
        assert [n for n, _ in e.named] == list(lora.trainable_shapes(c))
        runs[be] = train(e, c, 3)
        # the gradient and everything the optimizer holds are the trainable set's
        _, g = e.local_gradients(*batch(9, c))
        assert g.shape == (sum(int(np.prod(s)) for s in lora.trainable_shapes(c).values()),)
        assert all(np.abs(part).max() > 0 for part in e.flat.unflatten(g).values())   # B moved, so A's too
        after = base_now(e)
        frozen = [n for n in before if n not in lora.trainable_shapes(c)]
        for n in frozen:
            assert np.array_equal(after[n], before[n]), f"{be}: base {n} changed"
        assert set(e.state_dict()) == set(lora.trainable_shapes(c)) | \
            {f"optim.{mv}.{n}" for mv in "mv" for n in lora.trainable_shapes(c)} | {"optim.step"}
        if be == "torch":   # no gradient is even computed for the base
            assert all(p.grad is None for n, p in e.base_named if n in frozen)
    assert runs["torch"][:, 1].max() > 0.05   # clipping acted
    np.testing.assert_allclose(runs["torch"], runs["tensorflow"], rtol=2e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_zero1_equals_plain_dp(be):
    c0, c1 = cfg(), cfg(zero=1)
    a, b = engine(c0, be), engine(c1, be)
    np.testing.assert_allclose(train(b, c1, 3), train(a, c0, 3), rtol=1e-6)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:   # Adam's normalised steps on near-zero gradients: 1.6e-6 on lora_A's 0.18 measured
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-4 * float(np.abs(sa[k]).max()), err_msg=k)


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("be", BACKENDS)
def test_zero2_zero3_equal_plain_dp(be, zero):
    """ZeRO-2/3 (zero_sharded.units_for): units own only their adapters (block 0's c_attn and
    c_proj, block 1's), the head unit the classifier's head; the embedding unit owns nothing, so
    no backward runs there; the base stays whole and bit-identical."""
    tg = ["attn.c_attn", "h.1.mlp.c_proj"]
    c0, c = cfg(targets=tg, classify=True), cfg(targets=tg, zero=zero, classify=True)
    a, b = engine(c0, be), engine(c, be)
    assert b.zero.active == [1, 2, 3] and b.zero.lowest == 1
    before = base_now(b)
    got, want = train(b, c, 3), train(a, c0, 3)
    assert want[:, 1].min() > 0.05   # clipping acted
    np.testing.assert_allclose(got, want, rtol=1e-5)
    after = base_now(b)
    for n in before:
        if n not in task.HEAD:   # (TF's ZeRO-3 holds the head in its shards, not the variable)
            assert np.array_equal(after[n], before[n]), n
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-4 * float(np.abs(sa[k]).max()), err_msg=k)
    ev_a, ev_b = a.evaluate(*batch(11, c)), b.evaluate(*batch(11, c))
    assert ev_a.correct == ev_b.correct
    np.testing.assert_allclose(ev_b.loss_sum, ev_a.loss_sum, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("be", BACKENDS)
def test_merged_model_equals_lora_model(be, family):
    c = cfg(family, targets=["attn.*", "mlp.*"])
    e = engine(c, be)
    train(e, c, 3)
    x = batch(5, c)[0]
    want = logits(e, x)
    merged = lora.merge(base(c), e.state_dict(), c)
    plain = cfg(family)
    plain.finetune.lora_rank = 0
    p = BACKENDS[be].Engine(plain, Layout.build(plain.parallel, world_size=1, rank=0))
    p.load_state_dict(merged)
    got = logits(p, x)
    # float32 either way: W + s A^T B^T summed once (merge) or per forward; logits ~1, 1e-5 apart at most
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want - logits(engine(c, be), x)).max() > 1e-3   # the adapters did change the model


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("be", BACKENDS)
def test_resume_equals_uninterrupted(be, zero, tmp_path):
    from hvdllm import checkpoint
    c = cfg(zero=zero, classify=True)
    whole = engine(c, be)
    want = train(whole, c, 4)
    first = engine(c, be)
    got = train(first, c, 2)
    checkpoint.save(tmp_path, 2, first.state_dict(), {"step": 2})
    state, _ = checkpoint.load(tmp_path / "checkpoints" / "step_00000002")
    checkpoint.check_compatible(state, first.param_shapes, tmp_path)   # adapters + head only
    assert not any(n in state for n in params.param_shapes(task.model_config(c)) if n not in task.HEAD)
    again = engine(c, be)   # the base from train.init_from, then the checkpoint, as the trainer does
    again.load_state_dict(state)
    got = np.concatenate([got, train(again, c, 2, start=2)])
    np.testing.assert_array_equal(got, want)
    end, ref = again.state_dict(), whole.state_dict()
    for k in ref:
        np.testing.assert_array_equal(end[k], ref[k], err_msg=k)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("precision,checkpointing", [("bf16", "none"), ("fp32", "full")])
def test_precision_and_recompute_keep_the_base_frozen(be, precision, checkpointing):
    """bf16 autocast / the TF twin's 16-bit matmuls, and recomputed blocks, read the adapted
    weight through the same hook: they train the adapters and nothing else."""
    c = cfg()
    c.train.precision, c.train.activation_checkpointing = precision, checkpointing
    e = engine(c, be)
    before = base_now(e)
    steps = train(e, c, 2)
    assert np.isfinite(steps).all()
    after = base_now(e)
    assert all(np.array_equal(after[n], before[n]) for n in before)
    if checkpointing == "full":   # recomputation changes no number: the plain run's steps
        plain = engine(cfg(), be)
        np.testing.assert_allclose(steps, train(plain, cfg(), 2), rtol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sharded_units_that_own_nothing_sim(stage, k):
    """ZeroSharded as LoRA drives it (zero_sharded.units_for), on k simulated ranks and
    test_zero_sharded_sim's numpy model: the embedding and block 0 frozen (they own nothing, are
    never gathered or reduced), block 1 and the head's gain train. Equals AdamW on the trainable
    part of the dp-averaged gradient (clipping binding); no backward runs on the embedding; the
    frozen weights are never written."""
    from simcoll import run_group
    from test_zero_sharded_sim import LRS, SHAPES, USES, L, NumpyRunner, batches, init
    from test_zero_sharded_sim import cfg as optim_cfg

    from hvdllm.config import AggregationConfig
    from hvdllm.flat import FlatLayout
    from hvdllm.optim import FlatAdamW, clip_coef
    from hvdllm.strategies.zero_sharded import ZeroSharded
    trains = ["h.1.w", "h.1.b", "ln.g"]
    uses = [[n for n in names if n in trains] for names in USES]
    lay = FlatLayout({n: SHAPES[n] for n in trains})
    clip, steps, data = 0.05, 3, batches(k, 3, 1)

    class Frozen(NumpyRunner):
        backwards = ()

        def unit_backward(self, u, h, dy):
            self.backwards += (u,)
            dx, grads = super().unit_backward(u, h, dy)
            return dx, [g for n, g in zip(USES[u], grads) if n in trains]

    w0, opt = init(), FlatAdamW(lay.total, lay.decay_mask(), optim_cfg(clip))
    p, want_norms = lay.flatten({n: w0[n] for n in trains}), []
    for t in range(steps):   # the reference: one process, the whole gradient's trainable part
        run = NumpyRunner({**w0, **lay.unflatten(p)}, 1)
        avg = sum(lay.flatten({n: run.whole_grads(mbs[0])[n] for n in trains}) for mbs in data[t]) / np.float32(k)
        want_norms.append(float(np.linalg.norm(avg.astype(np.float64))))
        opt.step(p, (avg * np.float32(clip_coef(want_norms[-1], clip))).astype(np.float32), LRS[t])
    assert min(want_norms) > clip

    def body(comm):
        z = ZeroSharded(uses, [list(u) for u in uses], SHAPES, comm, optim_cfg(clip), AggregationConfig(), stage)
        assert z.active == [2, 3] and z.lowest == 2 and z.needs[0] == [] and z.needs[3] == [3]
        run = Frozen(init(), 1)
        z.init_params([run.concat_flat([run.w[n] for n in names]) if names else None for names in uses])
        if stage == 3:
            run.free_unit(trains)
        norms = []
        for t in range(steps):
            mbs = data[t][comm.rank]
            norms.append(z.step(run, [m[0] for m in mbs], [m[1] for m in mbs], LRS[t])[1])
        return z.host_params(), norms, run
    for got, norms, run in run_group(k, body):
        np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
        for n in trains:
            np.testing.assert_allclose(got[n], lay.unflatten(p)[n], rtol=1e-5, atol=1e-6, err_msg=n)
        for n in ("wte", "h.0.w", "h.0.b"):
            assert np.array_equal(run.w[n], w0[n]), n
        assert set(run.backwards) == {L + 1, L}   # none below the lowest unit that trains


# finetune.lora_dropout ------------------------------------------------------------------------
ALL = ["attn.*", "mlp.*"]   # every linear product of a block runs through GPT._xw / _linear


def seeded_train(e, c, steps):
    """train() from the torch global generator's seed (the masks' source; a test process builds
    several engines, each seeding it in its constructor, so it is set again here)."""
    torch.manual_seed(c.train.seed)
    return train(e, c, steps)


def test_lora_dropout_validation():
    for p, text in [(-0.1, "must be in [0, 1)"), (1.0, "must be in [0, 1)")]:
        bad = cfg(drop=p)
        bad.model.vocab_size = 256
        with pytest.raises(ConfigError, match=r"finetune.lora_dropout: " + text.replace("[", r"\[")
                           .replace("(", r"\(").replace(")", r"\)")):
            config.validate(bad)
    off = cfg(drop=0.1)
    off.model.vocab_size, off.finetune.lora_rank = 256, 0
    with pytest.raises(ConfigError, match="finetune.lora_rank = 0 has none; set finetune.lora_rank > 0"):
        config.validate(off)
    tf_full = cfg(drop=0.1)
    tf_full.model.vocab_size, tf_full.backend = 256, "tensorflow"
    config.validate(tf_full)
    tf_full.train.activation_checkpointing = "full"
    with pytest.raises(ConfigError, match="new finetune.lora_dropout masks"):
        config.validate(tf_full)
    tf_full.train.activation_checkpointing = "selective"   # no adapter in the recomputed core
    config.validate(tf_full)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("be", BACKENDS)
def test_lora_dropout_trains_adapters_evaluates_without(be, family):
    """p > 0: the training steps differ from p = 0's at the same seed (step 0's loss is the base
    model's either way, B = 0, but its gradient already reads the dropped inputs); the same seed
    again gives the same steps; only the adapters get gradients; evaluation, the eval-mode logits
    and the merged model equal p = 0's at the same weights (no dropout outside training)."""
    c, c0 = cfg(family, ALL, drop=0.3), cfg(family, ALL)
    e = engine(c, be)
    before = base_now(e)
    got = seeded_train(e, c, 3)
    plain = seeded_train(engine(c0, be), c0, 3)
    assert np.abs(got - plain).max() > 1e-3, "lora_dropout changed nothing"
    assert abs(got[0, 0] - plain[0, 0]) < 1e-6 and abs(got[0, 1] - plain[0, 1]) > 1e-4
    np.testing.assert_array_equal(seeded_train(engine(c, be), c, 3), got)   # reproducible from the seed
    after = base_now(e)
    assert all(np.array_equal(after[n], before[n]) for n in before)
    if be == "torch":
        assert all(p.grad is None for _, p in e.base_named)
    _, g = e.local_gradients(*batch(9, c))
    assert all(np.abs(part).max() > 0 for part in e.flat.unflatten(g).values())
    # the same weights at p = 0: evaluation and eval-mode logits are the same function
    same = engine(c0, be)
    same.load_state_dict(e.state_dict())
    x, y = batch(11, c)
    np.testing.assert_array_equal(logits(e, x), logits(same, x))
    assert e.evaluate(x, y).loss_sum == same.evaluate(x, y).loss_sum
    merged = lora.merge(base(c), e.state_dict(), c)
    flat = cfg(family)
    flat.finetune.lora_rank = 0
    m = BACKENDS[be].Engine(flat, Layout.build(flat.parallel, world_size=1, rank=0))
    m.load_state_dict(merged)
    np.testing.assert_allclose(logits(m, x), logits(e, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("be", BACKENDS)
def test_unfolded_path_equals_folded(be, family):
    """The unfolded forward (x @ W + s (x A^T) B^T, what p > 0 trains with) forced at p = 0 is the
    folded one (x @ (W + s A^T B^T)): the same steps (losses, gradient norms) and weights, to
    float32's rounding of the two orders of summation."""
    c = cfg(family, ALL)
    folded, unfolded = engine(c, be), engine(c, be)
    unfolded.model.adapters.unfold = True
    want, got = train(folded, c, 3), train(unfolded, c, 3)
    assert want[:, 1].min() > 0.05   # clipping acted
    np.testing.assert_allclose(got, want, rtol=2e-5)
    sa, sb = folded.state_dict(), unfolded.state_dict()
    for k in sa:   # Adam's normalised step on a near-zero gradient element: 5.5e-6 on llama's v.lora_B's 0.03 measured
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-3 * float(np.abs(sa[k]).max()), err_msg=k)


@pytest.mark.parametrize("which", ["lora", "model"])
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("be", BACKENDS)
def test_lora_dropout_zero2_zero3_equal_plain_dp(be, zero, which):
    """ZeRO-2/3 with lora_dropout > 0 (or model.dropout: the same generator) take ZeRO-0's steps at
    the same seed: the units draw the forward's masks in the same order, and TF ZeRO-3's recompute
    in the backward (sharded.py) sees the forward's masks again (the generator's state from before
    the unit's forward restored), else its gradients would be another mask's."""
    tg = ["attn.c_attn", "h.1.mlp.c_proj"]
    c0, c = cfg(targets=tg, classify=True), cfg(targets=tg, zero=zero, classify=True)
    for one in (c0, c):
        if which == "lora":
            one.finetune.lora_dropout = 0.3
        else:
            one.model.dropout = 0.1
    a, b = engine(c0, be), engine(c, be)
    want, got = seeded_train(a, c0, 3), seeded_train(b, c, 3)
    nodrop = cfg(targets=tg, classify=True)
    assert np.abs(want - seeded_train(engine(nodrop, be), nodrop, 3)).max() > 1e-3   # the masks acted
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-4 * float(np.abs(sa[k]).max()), err_msg=k)


@pytest.mark.parametrize("be,checkpointing", [("torch", "full"), ("torch", "selective"), ("tensorflow", "selective")])
def test_lora_dropout_under_activation_checkpointing(be, checkpointing):
    """Recomputation sees the forward's adapter masks: torch's non-reentrant checkpoint restores
    the generator; TF's 'selective' recomputes only the attention core, where no adapter sits
    ('full' is refused there, test_lora_dropout_validation). The steps are the plain run's."""
    c, plain = cfg(targets=ALL, drop=0.3), cfg(targets=ALL, drop=0.3)
    c.train.activation_checkpointing = checkpointing
    np.testing.assert_allclose(seeded_train(engine(c, be), c, 2), seeded_train(engine(plain, be), plain, 2),
                               rtol=1e-6)


def test_merged_export_is_a_plain_model_without_lora_dropout(tmp_path):
    """convert --merge-lora of a lora_dropout run: the merged weights are base + s A^T B^T, and the
    config it records is a plain model's that validation accepts (lora_rank and lora_dropout 0:
    a lora_dropout with no adapters is refused)."""
    import json

    from hvdllm import checkpoint, cli
    c = cfg(drop=0.3)
    c.model.vocab_size = 256
    e = engine(c)
    seeded_train(e, c, 2)
    base_dir = checkpoint.save(tmp_path / "base", 1, base(c), {"step": 1, "config": c.to_dict()})
    checkpoint.save(tmp_path / "lora", 2, e.state_dict(), {"step": 2, "config": c.to_dict(),
                                                           "lora_base": str(base_dir)})
    assert cli.main(["convert", str(tmp_path / "lora"), str(tmp_path / "m.npz"), "--merge-lora"]) == 0
    with np.load(tmp_path / "m.npz") as z:
        got, meta = {k: z[k] for k in z.files if k != "__meta__"}, json.loads(str(z["__meta__"]))
    want = lora.merge(base(c), e.state_dict(), c)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], w) for k, w in want.items())
    plain = config.from_dict(meta["config"])
    assert (plain.finetune.lora_rank, plain.finetune.lora_dropout) == (0, 0.0)
    config.validate(plain)
