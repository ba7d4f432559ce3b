"""model.family = "llama" under every layout equals one process: dp=2, dp=2 with ZeRO-1, dp=2
accumulating 2 micro-batches, tp=2 (grouped-query attention, its key/value heads split across the
tp ranks; tied and untied head) and pp=2 (tied and untied head; interleaved, 2 chunks per stage),
tp=2 and pp=2 recomputing activations (train.activation_checkpointing), dp=2 and tp=2 in bfloat16
and float16 (train.precision, against np=1 in 16 bits, to LOW_RTOL; fp16 skipping an overflowed
step on every rank) give the np=1 losses, gradient norms, validation losses and weights, in both
frameworks; under tp=2 each block issues 2 allreduces forward and 2 backward.

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
    "tp2_recompute_full": ["parallel.tp=2", 'train.activation_checkpointing="full"'],
    "pp2_recompute_selective": ["parallel.pp=2", "parallel.microbatches=2",
                                'train.activation_checkpointing="selective"'],
    # bfloat16 compute (train.precision) against np=1's bfloat16: the batch split and tp's partial
    # sums change which products are rounded to bfloat16 together, so LOW_RTOL
    "dp2_bf16": ["parallel.dp=2", 'train.precision="bf16"'],
    "tp2_bf16": ["parallel.tp=2", 'train.precision="bf16"'],
    # float16 with loss scaling: rank 1's gradients overflow at step 1 (the testing aid), so
    # every rank must skip that step, as np=1 skips it
    "dp2_fp16": ["parallel.dp=2", 'train.precision="fp16"'],
    "tp2_fp16": ["parallel.tp=2", 'train.precision="fp16"'],
}
LOW = ['train.precision="bf16"', 'train.precision="fp16"']
LOW_RTOL = 2e-2   # a few 16-bit roundings (2^-8 each in bfloat16) of the gradients, through 3 AdamW steps
OVERFLOW_STEP = 1
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=2", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
          "train.threads=1", "train.seed=1234"]


@pytest.mark.integration
def test_llama_layouts_equal_single_process():
    from launch_util import mpirun_argv, run
    r = run(mpirun_argv(2) + [sys.executable, str(Path(__file__).resolve())], timeout=420)
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in BACKENDS:
        for name in LAYOUTS:
            assert f"{backend} {name}: equals np=1" in r.stdout, r.stdout[-6000:]
        assert f"{backend} tp2 collectives: 2 + 2 allreduces per block" in r.stdout, r.stdout[-6000:]


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
        if fp16 and step == OVERFLOW_STEP and (layout.dp * layout.tp == 1 or layout.rank == 1):
            engine.inject_overflow = True   # np=1's only rank, or rank 1 of two
        res = engine.train_step(x[d * per:(d + 1) * per], y[d * per:(d + 1) * per],
                                lr_schedule.lr_at(step, cfg.optim, cfg.train.steps))
        assert res.skipped == (fp16 and step == OVERFLOW_STEP), (step, res)
        out.append((res.loss, res.grad_norm if not res.skipped else -1.0))   # a skipped step's norm is inf or nan
    ev = engine.evaluate(vx[d * per:(d + 1) * per], vy[d * per:(d + 1) * per])
    total = engine.allreduce_sum([ev.loss_sum, ev.tokens]) if dp > 1 else np.array([ev.loss_sum, ev.tokens])
    return np.array(out), float(total[0] / total[1]), engine.full_params()


def _check(backend, rt, be):
    import numpy as np

    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine, build_solo_engine
    refs = {}
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
        if layout.pp_rank == 0:   # the stages gathered there, the tp slices joined
            assert sorted(weights) == sorted(want_weights), (name, sorted(set(weights) ^ set(want_weights)))
            for k, a in want_weights.items():
                scale = float(np.max(np.abs(a)))
                # bf16: where a gradient is ~0, AdamW turns rounding into moves of up to lr per step
                atol = STEPS * cfg.optim.lr if low else 1e-4 * scale
                np.testing.assert_allclose(weights[k], a, rtol=0, atol=atol, err_msg=f"{backend} {name}: {k}")
        print(f"{backend} {name}: equals np=1 (rank {rt.rank}; losses {np.round(steps[:, 0], 4).tolist()})",
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
    sys.path.insert(0, str(ROOT / "tests" / "parallel"))
    from hvdllm import backends, runtime
    for backend in BACKENDS:
        be = backends.load(backend)
        if backend == "tensorflow":   # each engine traces its own functions: retracing is expected
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")
        rt = runtime.start(be, groups=[(0,), (1,)])   # one-rank sets for the np=1 references
        _check(backend, rt, be)
        _check_tp_collectives(backend, be)


if __name__ == "__main__":
    main()
