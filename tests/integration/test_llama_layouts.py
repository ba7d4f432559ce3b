"""model.family = "llama" under every layout equals one process: dp=2, dp=2 with ZeRO-1, dp=2
accumulating 2 micro-batches, tp=2 (grouped-query attention, its key/value heads split across the
tp ranks; tied and untied head) and pp=2 (tied and untied head; interleaved, 2 chunks per stage),
dp=2, tp=2 and pp=2 recomputing activations (train.activation_checkpointing: also equal to the
same layout without it, to 1e-6), dp=2, ZeRO-1, tp=2 and
pp=2 in bfloat16 and float16 (train.precision, against np=1 in 16 bits, to LOW_RTOL; fp16 skipping
an overflowed step on every rank and ending with np=1's loss scale) give the np=1 losses, gradient
norms, validation losses and weights, in both frameworks; under tp=2 each block issues 2
allreduces forward and 2 backward. A second launch trains 200 steps in bf16 at each of those
layouts and checks that they learn as np=1's fp32 does.

One launch for all of it (each launch pays the imports of torch, TensorFlow and Horovod): this
file is also the program mpirun runs. On each of the 2 ranks, for each backend, a one-rank
engine of the process's own (its one-rank Horovod process set) is the np=1 reference, and each
layout's engines are built by hvdllm.parallelize.build_engine, as the trainer builds them, and
fed the batches the trainer would feed them. A second test trains through a parameter server
with an evaluator rank beside it (hvdllm train at np=3)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "tensorflow")
V, T, STEPS, BATCH = 256, 16, 3, 8   # V: the byte tokenizer's (validation requires it)
MODEL = ["model.family=llama", "model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.n_kv_head=2",
         f"model.vocab_size={V}", f"model.block_size={T}", "model.ffn_hidden=48"]
UNTIED = ["model.tie_embeddings=false"]
LAYOUTS = {  # name: settings (2 ranks)
    "dp2": ["parallel.dp=2"],
    "dp2_zero1": ["parallel.dp=2", "parallel.zero=1"],
    "dp2_accumulate2": ["parallel.dp=2", "aggregation.accumulation=2"],
    "tp2": ["parallel.tp=2"],
    "tp2_untied": ["parallel.tp=2", *UNTIED],
    "pp2": ["parallel.pp=2", "parallel.microbatches=2"],
    "pp2_untied": ["parallel.pp=2", "parallel.microbatches=2", *UNTIED],
    "pp2_interleaved": ["parallel.pp=2", "parallel.microbatches=2", "parallel.schedule=interleaved",
                        "parallel.virtual_stages=2"],   # 4 chunks: embedding, 2 blocks, head
    # recomputation (train.activation_checkpointing) under tp re-issues a block's forward
    # allreduces in backward, and in a pipeline runs inside a stage's backward
    "dp2_recompute_selective": ["parallel.dp=2", 'train.activation_checkpointing="selective"'],
    "tp2_recompute_full": ["parallel.tp=2", 'train.activation_checkpointing="full"'],
    "pp2_recompute_selective": ["parallel.pp=2", "parallel.microbatches=2",
                                'train.activation_checkpointing="selective"'],
    # bfloat16 compute (train.precision) against np=1's bfloat16: the batch split and tp's partial
    # sums change which products are rounded to bfloat16 together, so LOW_RTOL
    "dp2_bf16": ["parallel.dp=2", 'train.precision="bf16"'],
    "dp2_zero1_bf16": ["parallel.dp=2", "parallel.zero=1", 'train.precision="bf16"'],
    "tp2_bf16": ["parallel.tp=2", 'train.precision="bf16"'],
    "pp2_bf16": ["parallel.pp=2", "parallel.microbatches=2", 'train.precision="bf16"'],
    # float16 with loss scaling: rank 1's gradients overflow at step 1 (the testing aid), so
    # every rank must skip that step, as np=1 skips it, and end with np=1's scale: under pp
    # rank 1 is the last stage, so the first stage skips on the pipeline's norm alone
    "dp2_fp16": ["parallel.dp=2", 'train.precision="fp16"'],
    "dp2_zero1_fp16": ["parallel.dp=2", "parallel.zero=1", 'train.precision="fp16"'],
    "tp2_fp16": ["parallel.tp=2", 'train.precision="fp16"'],
    "pp2_fp16": ["parallel.pp=2", "parallel.microbatches=2", 'train.precision="fp16"'],
}
# bf16 against fp32 over a longer run of learning a pattern, at each layout: the two
# trajectories part (as any two roundings do) but must learn alike (tests/unit/test_precision.py
# in one process); the fp32 reference is np=1's (each layout equals it in fp32, above)
LEARN = {name: LAYOUTS[name][:-1] for name in ("dp2_bf16", "dp2_zero1_bf16", "tp2_bf16", "pp2_bf16")}
LEARN_STEPS, LEARN_LR = 200, 3e-3
LEARN_MARGIN = 0.03   # |mean of the last 10 losses, bf16 - fp32| <= this x the first loss
# recomputation changes no number: each recomputing layout also equals its layout without it,
# to RECOMPUTE_RTOL (as tests/unit/test_activation_checkpointing.py in one process)
RECOMPUTE_BASE = {"dp2_recompute_selective": "dp2", "tp2_recompute_full": "tp2", "pp2_recompute_selective": "pp2"}
RECOMPUTE_RTOL = 1e-6
LOW = ['train.precision="bf16"', 'train.precision="fp16"']
LOW_RTOL = 2e-2   # a few 16-bit roundings (2^-8 each in bfloat16) of the gradients, through 3 AdamW steps
OVERFLOW_STEP = 1
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=2", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
          "train.threads=1", "train.seed=1234"]


@pytest.mark.integration
def test_llama_layouts_equal_single_process():
    from launch_util import mpirun_argv, run
    r = run(mpirun_argv(2) + [sys.executable, str(Path(__file__).resolve())], timeout=560)
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in BACKENDS:
        for name in LAYOUTS:
            assert f"{backend} {name}: equals np=1" in r.stdout, r.stdout[-6000:]
        assert f"{backend} tp2 collectives: 2 + 2 allreduces per block" in r.stdout, r.stdout[-6000:]


@pytest.mark.integration
def test_bf16_learns_as_fp32_at_every_layout():
    """LEARN_STEPS of bf16 at dp=2, ZeRO-1, tp=2 and pp=2 end within LEARN_MARGIN of np=1's
    fp32 (its own launch: 200 steps at 5 layouts would take the launch above past its deadline
    on a loaded machine)."""
    from launch_util import mpirun_argv, run
    r = run(mpirun_argv(2) + [sys.executable, str(Path(__file__).resolve()), "learn"], timeout=540)
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in BACKENDS:
        for name in LEARN:
            assert f"{backend} {name}: learns as fp32" in r.stdout, r.stdout[-6000:]


@pytest.mark.integration
def test_llama_parameter_server_and_evaluator_equal_single_process(tmp_path, reference):
    """Parameter servers and role ranks move the flat parameters (hvdllm.params order): a llama
    with multi-query attention and an untied head trains at np=3 (1 worker, 1 server, 1
    evaluator) as at np=1, and the evaluator's numbers are the trainers' own."""
    from launch_util import by_step, records, same_run, train
    sets = ["model.family=llama", "model.n_kv_head=1", "model.tie_embeddings=false", "train.batch_size=8"]
    ref = reference(*sets)
    r, d = train(tmp_path, "ps_eval", 3,
                 sets + ["ps.servers=1", "roles.evaluators=1", "roles.snapshot_every=3"], timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=1e-5, keys=("loss", "grad_norm"), what="llama ps + evaluator")
    from hvdllm import metrics
    evaluated = {x["step"]: x["val_loss"] for x in metrics.read(d / "metrics.jsonl") if x.get("role") == "evaluator"}
    want = by_step(ref, "val_loss")
    # a busy evaluator skips a snapshot (by design: rank 0 never waits for it); the final weights
    # always reach it
    assert max(evaluated) == max(want) and set(evaluated) <= set(want) and records(d), (evaluated, want)
    for step, v in evaluated.items():
        assert abs(v - want[step]) <= 1e-5 * want[step], (step, v, want[step])


# ---------------------------------------------------------------------------------------------
# The program each rank runs.

def _cfg(sets):
    from hvdllm import config as config_mod
    cfg = config_mod.load(None, [*MODEL, *COMMON, *sets])
    return config_mod.validate(cfg, world_size=2 if any(s.startswith("parallel.") for s in sets) else None)


def _batches():
    import numpy as np
    rng = np.random.default_rng(0)
    return [(rng.integers(0, V, (BATCH, T)), rng.integers(0, V, (BATCH, T))) for _ in range(STEPS + 1)]


def _train(engine, cfg, layout):
    """Per step (loss, grad norm), then the validation loss (summed over the dp group) and the
    whole parameters (on the first pipeline stage)."""
    import numpy as np

    from hvdllm import lr as lr_schedule
    dp, d = layout.dp, layout.dp_rank
    out = []
    *train, (vx, vy) = _batches()
    per = BATCH // dp
    for step, (x, y) in enumerate(train):
        fp16 = cfg.train.precision == "fp16"
        if fp16 and step == OVERFLOW_STEP and (layout.world_size == 1 or layout.rank == 1):
            engine.inject_overflow = True   # np=1's only rank, or rank 1 of two
        res = engine.train_step(x[d * per:(d + 1) * per], y[d * per:(d + 1) * per],
                                lr_schedule.lr_at(step, cfg.optim, cfg.train.steps))
        assert res.skipped == (fp16 and step == OVERFLOW_STEP), (step, res)
        out.append((res.loss, res.grad_norm if not res.skipped else -1.0))   # a skipped step's norm is inf or nan
    ev = engine.evaluate(vx[d * per:(d + 1) * per], vy[d * per:(d + 1) * per])
    total = engine.allreduce_sum([ev.loss_sum, ev.tokens]) if dp > 1 else np.array([ev.loss_sum, ev.tokens])
    if engine.scaler is not None:   # fp16: the scale, halved once, as np=1's on every rank
        out.append((engine.scaler.scale, engine.scaler.good))
    return np.array(out), float(total[0] / total[1]), engine.full_params()


def _learn(engine, layout):
    import numpy as np
    from launch_util import pattern_batches
    per, d = BATCH // layout.dp, layout.dp_rank
    return np.array([float(engine.train_step(x[d * per:(d + 1) * per], y[d * per:(d + 1) * per], LEARN_LR).loss)
                     for x, y in pattern_batches(LEARN_STEPS, BATCH, T)])


def _check_learning(backend, rt, be):
    """LEARN_STEPS steps of the pattern in bf16 at each layout learn as np=1's fp32 does."""
    import time

    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine, build_solo_engine
    ref_cfg = _cfg([])
    ref = _learn(build_solo_engine(ref_cfg, rt, be, ranks=[rt.rank]), Layout(world_size=1, rank=0, dp=1))
    end32 = ref[-10:].mean()
    assert end32 < 0.5 * ref[0], f"{backend}: the pattern was not learned ({ref[0]} -> {end32}): the test means nothing"
    for name, sets in LEARN.items():
        cfg = _cfg([*sets, 'train.precision="bf16"'])
        layout = Layout.from_config(cfg, rt.size, rt.rank)
        t0 = time.perf_counter()
        got = _learn(build_engine(cfg, layout, rt, be), layout)
        took = time.perf_counter() - t0
        end16 = got[-10:].mean()
        assert got[0] != ref[0], f"{backend} {name}: bf16 gave float32's first loss: it was not used"
        assert abs(end16 - end32) <= LEARN_MARGIN * ref[0], (backend, name, ref[0], end32, end16)
        print(f"{backend} {name}: learns as fp32 ({ref[0]:.4f} -> {end32:.4f} fp32, {end16:.4f} bf16; "
              f"{LEARN_STEPS} steps in {took:.1f} s)", flush=True)


def _check(backend, rt, be):
    import numpy as np

    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine, build_solo_engine
    refs, runs = {}, {}
    for name, sets in LAYOUTS.items():
        key = tuple(s for s in sets if s in UNTIED or s in LOW)   # what the np=1 reference shares
        if key not in refs:
            ref_cfg = _cfg(list(key))
            refs[key] = _train(build_solo_engine(ref_cfg, rt, be, ranks=[rt.rank]), ref_cfg,
                               Layout(world_size=1, rank=0, dp=1))
        cfg = _cfg(sets)
        layout = Layout.from_config(cfg, rt.size, rt.rank)
        steps, val, weights = _train(build_engine(cfg, layout, rt, be), cfg, layout)
        want_steps, want_val, want_weights = refs[key]
        low = any(s in LOW for s in sets)
        rtol = LOW_RTOL if low else 1e-5
        np.testing.assert_allclose(steps, want_steps, rtol=rtol, err_msg=f"{backend} {name}: (loss, grad norm)")
        np.testing.assert_allclose(val, want_val, rtol=rtol, err_msg=f"{backend} {name}: validation loss")
        runs[name] = steps
        if name in RECOMPUTE_BASE:
            np.testing.assert_allclose(steps, runs[RECOMPUTE_BASE[name]], rtol=RECOMPUTE_RTOL,
                                       err_msg=f"{backend} {name}: (loss, grad norm) against {RECOMPUTE_BASE[name]}")
        if layout.pp_rank == 0:   # the stages gathered there, the tp slices joined
            assert sorted(weights) == sorted(want_weights), (name, sorted(set(weights) ^ set(want_weights)))
            for k, a in want_weights.items():
                scale = float(np.max(np.abs(a)))
                # bf16: where a gradient is ~0, AdamW turns rounding into moves of up to lr per step
                atol = STEPS * cfg.optim.lr if low else 1e-4 * scale
                np.testing.assert_allclose(weights[k], a, rtol=0, atol=atol, err_msg=f"{backend} {name}: {k}")
        print(f"{backend} {name}: equals np=1 (rank {rt.rank}; losses {np.round(steps[:STEPS, 0], 4).tolist()})",
              flush=True)


def _check_tp_collectives(backend, be):
    """Two more llama blocks under tp=2 issue exactly four more allreduces in each direction
    (2 per block, as GPT: attention's f/g and the MLP's f/g; q, k and v share one f)."""
    from tests_tp_helpers import loss_and_grads

    from hvdllm.config import ModelConfig
    tp = be.tensor_parallel.TPGroup(be.Collectives())
    x, y = _batches()[0]
    counts = {n: loss_and_grads(be, ModelConfig(family="llama", n_layer=n, n_embd=32, n_head=4, n_kv_head=2,
                                                block_size=T, vocab_size=V), tp, x, y)[2] for n in (2, 4)}
    for direction in ("forward", "backward"):
        assert counts[4][direction] - counts[2][direction] == 4, (backend, counts)
    print(f"{backend} tp2 collectives: 2 + 2 allreduces per block", flush=True)


def main():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "parallel"))
    from hvdllm import backends, runtime
    for backend in BACKENDS:
        be = backends.load(backend)
        if backend == "tensorflow":   # each engine traces its own functions: retracing is expected
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")
        rt = runtime.start(be, groups=[(0,), (1,)])   # one-rank sets for the np=1 references
        if sys.argv[1:] == ["learn"]:
            _check_learning(backend, rt, be)
        else:
            _check(backend, rt, be)
            _check_tp_collectives(backend, be)
        # Horovod shuts down for every rank when the first one leaves: a rank done early (a
        # pipeline's first stage, whose loss allreduce is over its one-rank dp set) must wait
        # here for the other, sleeping, not spinning
        from mpi import p2p
        p2p.wait(rt.comm.Ibarrier(), 300, f"{backend}: the other rank's end")


if __name__ == "__main__":
    main()
