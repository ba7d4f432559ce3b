"""task.kind = 'classify' at np=2 equals np=1, and the fine-tuning workflow end to end.

1. One launch (each launch pays the imports of torch, TensorFlow and Horovod): this file is also
   the program mpirun runs. On each of the 2 ranks, for each backend, a one-rank engine of the
   process's own (its one-rank Horovod process set) trained on the whole global batch is the
   np=1 reference; each layout's engines are built by hvdllm.parallelize.build_engine, as the
   trainer builds them, and fed the batches labelled.ExampleSampler hands their dp rank. Losses
   and gradient norms agree to 1e-5 under plain dp and under ZeRO-1 with accumulation, clipping,
   mean pooling and class weights, with LoRA adapters (finetune.lora_rank) under dp and ZeRO-1,
   and to 5e-5 under tp=2, and under ZeRO-2 and ZeRO-3 (plain and LoRA, the LoRA base
   bit-identical after training); the distributed evaluation of 101 validation
   examples (uneven shares over dp) has the np=1 confusion matrix exactly.
   The pipeline layouts (pp=2: the head on the last stage; and with ZeRO-3 stages, the head
   unit gathered for the loss and for the scores) share those references; their
   weights, gathered as a snapshot for an evaluator rank and scored as it scores them, give the
   pipeline's own evaluation exactly.
2. `hvdllm train` (torch, np=3: dp=2 and an evaluator rank, roles.evaluators = 1) on JSONL
   training data and CSV validation data, then `hvdllm predict --backend tensorflow` (one
   process) on the validation texts: the other framework's predictions give the confusion matrix
   the run's distributed evaluation logged, the evaluator's record of the final snapshot equals
   the trainers' final evaluation exactly (loss, accuracy, macro-F1, per-class scores, confusion
   matrix), and the run holds labels.json, confusion.png and the evaluator's PNG.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "tensorflow")
T, BATCH, STEPS = 24, 4, 3   # BATCH: per rank and micro-batch
MODEL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"model.block_size={T}", "model.vocab_size=256"]
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=1", f"train.steps={STEPS}", "train.threads=1", "train.seed=5"]
LORA = ["finetune.lora_rank=4", 'finetune.lora_targets=["attn.c_attn","mlp.c_fc"]', "train.init_from=base",
        "optim.grad_clip=0.05"]
CLIP_MEAN_WEIGHTS = ["optim.grad_clip=0.05", "task.pooling=mean", "task.class_weights=[1.0,2.0,0.5]"]
LAYOUTS = {   # name: (settings the np=1 reference shares, layout settings)
    "dp2": ([], ["parallel.dp=2"]),
    "dp2_zero1_accum2_clip_mean_weights": (CLIP_MEAN_WEIGHTS,
                                           ["parallel.dp=2", "parallel.zero=1", "aggregation.accumulation=2"]),
    # the head replicated on the tp ranks, the backbone split; dp2's global batch: its reference
    "tp2": ([], ["parallel.tp=2", f"train.batch_size={2 * BATCH}"]),
    # LoRA (hvdllm/lora.py): only the adapters and the head are reduced and stepped; the frozen
    # base is the seeded model here (the engines are built directly, train.init_from is not read)
    "dp2_lora_clip": (LORA, ["parallel.dp=2"]),
    "dp2_zero1_accum2_lora_clip": (LORA, ["parallel.dp=2", "parallel.zero=1", "aggregation.accumulation=2"]),
    # the head on the last stage (it gets the labels and lengths), layers 0..3 split over 2 stages,
    # 4 micro-batches; dp2_zero1_accum2's global batch: its np=1 reference (one layout only: each
    # costs the launch ~1/6 more; 'last' pooling is the same Classifier.head code as under dp)
    "pp2_clip_mean_weights": (CLIP_MEAN_WEIGHTS, ["parallel.pp=2", f"train.batch_size={4 * BATCH}",
                                                  "parallel.microbatches=4"]),
    # ZeRO-3 pipeline stages (ShardedStageBase; dp=1 at np=2): the head unit, gathered for each
    # micro-batch's loss and for the evaluation's scores on the last stage
    "pp2_zero3_clip_mean_weights": (CLIP_MEAN_WEIGHTS, ["parallel.pp=2", "parallel.zero=3",
                                                        f"train.batch_size={4 * BATCH}", "parallel.microbatches=4"]),
    # ZeRO-2/3 (zero_sharded.py): the head is the last unit (its pooling reads y's lengths); under
    # LoRA only the adapters and the head are units' parameters, the base stays whole. Each
    # shares a reference above (no new np=1 run)
    "dp2_zero2": ([], ["parallel.dp=2", "parallel.zero=2"]),
    "dp2_zero3_accum2_clip_mean_weights": (["optim.grad_clip=0.05", "task.pooling=mean",
                                            "task.class_weights=[1.0,2.0,0.5]"],
                                           ["parallel.dp=2", "parallel.zero=3", "aggregation.accumulation=2"]),
    "dp2_zero2_lora_clip": (LORA, ["parallel.dp=2", "parallel.zero=2"]),
    "dp2_zero3_accum2_lora_clip": (LORA, ["parallel.dp=2", "parallel.zero=3", "aggregation.accumulation=2"]),
}
WORDS = {"neg": ["bad", "sad", "poor"], "pos": ["good", "fine", "nice"], "neu": ["road", "table", "seven"]}


def write_data(folder: Path, n_train=96, n_val=101):
    """Texts whose label shows in their words (a learnable task); JSONL training data, CSV validation."""
    import csv
    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for _ in range(n):
            lab = str(rng.choice(list(WORDS)))
            out.append((" ".join(rng.choice(WORDS[lab] + WORDS["neu"], rng.integers(1, 6))), lab))
        return out
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows(n_train)]
    (folder / "train.jsonl").write_text("".join(lines))
    with open(folder / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows(n_val))
    return folder / "train.jsonl", folder / "val.csv"


@pytest.mark.integration
def test_classify_layouts_equal_single_process(tmp_path):
    from launch_util import mpirun_argv, run
    write_data(tmp_path)
    # 420 s was too tight on a loaded machine: 641 s for the layouts before pp (load 30)
    r = run(mpirun_argv(2) + [sys.executable, str(Path(__file__).resolve()), str(tmp_path)], timeout=900)
    assert r.returncode == 0, r.stdout[-6000:]
    for backend in BACKENDS:
        for name in LAYOUTS:
            assert f"{backend} {name}: equals np=1" in r.stdout, r.stdout[-6000:]


@pytest.mark.integration
def test_train_at_dp2_with_an_evaluator_then_predict_with_the_other_framework(tmp_path):
    from launch_util import hvdllm, run
    train, val = write_data(tmp_path / "data")
    out = tmp_path / "run"
    sets = [*MODEL, "optim.lr=3e-3", "optim.warmup_steps=1", "train.threads=1", "task.kind=classify",
            f"task.train_file={train}", f"task.validation_file={val}", "train.steps=12", "train.batch_size=8",
            "train.eval_every=0", "train.progress=false", f"train.out_dir={out}", "roles.evaluators=1",
            "roles.snapshot_every=6"]
    r = hvdllm(3, ["train"] + [a for kv in sets for a in ("--set", kv)], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "majority-class baseline" in r.stdout, r.stdout[-2000:]
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["neg", "neu", "pos"]}
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in records if "val_acc" in x and "role" not in x][-1]
    # the evaluator (rank 2) scored the final snapshot on the trainers' shares: the same numbers
    mine = [x for x in records if x.get("role") == "evaluator" and x["step"] == final["step"]]
    assert len(mine) == 1 and mine[0]["rank"] == 2, records
    assert {k: mine[0][k] for k in final if k != "step"} == {k: v for k, v in final.items() if k != "step"}
    assert (out / "confusion_evaluator2.png").read_bytes()[:4] == b"\x89PNG"
    p = run([sys.executable, "-m", "hvdllm", "predict", str(out), "--input", str(val), "--backend", "tensorflow",
             "--batch-size", "7", "--output", str(tmp_path / "pred.jsonl")], timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    import csv
    with open(val, newline="") as f:
        truth = [row["label"] for row in csv.DictReader(f)]
    assert len(preds) == len(truth) == final["val_examples"] == 101
    assert all(abs(sum(q["probs"].values()) - 1) < 1e-5 and q["label"] == max(q["probs"], key=q["probs"].get)
               for q in preds)
    assert sum(q["label"] == t for q, t in zip(preds, truth)) == round(final["val_acc"] * 101)
    cm = np.zeros((3, 3), int)
    names = ["neg", "neu", "pos"]
    for q, t in zip(preds, truth):
        cm[names.index(t), q["label_id"]] += 1
    assert cm.tolist() == final["val_confusion"]


# ---------------------------------------------------------------------------------------------
# The program each rank runs.

def _cfg(folder, sets, world):
    from hvdllm import config as config_mod
    from hvdllm import labelled, task
    cfg = config_mod.load(None, [*MODEL, *COMMON, "task.kind=classify", f"task.train_file={folder}/train.jsonl",
                                 f"task.validation_file={folder}/val.csv", f"train.batch_size={BATCH}", *sets])
    cfg = config_mod.validate(cfg, world_size=world)
    data = labelled.prepare(cfg, rank=1)   # rank 1: no summary line
    return task.resolve(cfg, data.labels), data


def _train(engine, cfg, data, dp, rank):
    """Per step (loss, grad norm), then the distributed evaluation of the validation set."""
    from hvdllm import classify_eval, labelled
    from hvdllm import lr as lr_schedule
    k = cfg.aggregation.accumulation
    sampler = labelled.ExampleSampler(data.train, cfg.train.batch_size * k, dp, rank, cfg.train.seed)
    out = []
    for step in range(STEPS):
        res = engine.train_step(*sampler.batch(step), lr_schedule.lr_at(step, cfg.optim, cfg.train.steps))
        out.append((res.loss, res.grad_norm))
    ev = classify_eval.evaluate(engine, data.val, 8, dp, rank, cfg.task.labels)
    return np.array(out), ev


def _frozen(engine) -> dict:
    """LoRA: the frozen base's values on this rank (the head trains: not in it)."""
    from hvdllm import task
    if not engine.lora:
        return {}
    return {n: np.array(engine.to_host(p)) for n, p in engine.base_named if n not in task.HEAD}


def _check(backend, rt, be, folder):
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine, build_solo_engine
    refs = {}
    for name, (shared, layout_sets) in LAYOUTS.items():
        cfg, data = _cfg(folder, [*shared, *layout_sets], 2)
        layout = Layout.from_config(cfg, rt.size, rt.rank)
        # the np=1 reference: one rank, the whole global batch (dp x batch x accumulation) per step
        ref_sets = (*shared, f"train.batch_size={layout.dp * cfg.train.batch_size * cfg.aggregation.accumulation}")
        if ref_sets not in refs:
            ref_cfg, _ = _cfg(folder, list(ref_sets), None)
            refs[ref_sets] = _train(build_solo_engine(ref_cfg, rt, be, ranks=[rt.rank]), ref_cfg, data, 1, 0)
        want_steps, want_ev = refs[ref_sets]
        engine = build_engine(cfg, layout, rt, be)
        frozen = _frozen(engine)
        steps, ev = _train(engine, cfg, data, layout.dp, layout.dp_rank)
        after = _frozen(engine)
        assert all(np.array_equal(after[n], v) for n, v in frozen.items()), f"{backend} {name}: the base moved"
        if layout.pp > 1:   # what an evaluator rank records of these weights: the same counts
            got = _evaluator_record(engine, cfg, layout, data, rt, be)
            if got is not None:
                # the loss to float32 rounding: the activations a stage receives sit in other
                # buffers than one process's (measured 2.4e-8 relative on torch)
                np.testing.assert_allclose(got.pop("val_loss"), ev["val_loss"], rtol=1e-6, err_msg=name)
                assert got == {k: v for k, v in ev.items() if k != "val_loss"}, (name, got, ev)
        # tp sums each row-parallel product's partial sums in another order than one process:
        # measured 1.1e-5 on TensorFlow's third gradient norm, so tp is held to 5e-5, dp to 1e-5
        rtol = 5e-5 if "tp" in name else 1e-5
        np.testing.assert_allclose(steps, want_steps, rtol=rtol, err_msg=f"{backend} {name}: (loss, grad norm)")
        if "clip" in name:
            assert want_steps[:, 1].min() > 0.05, f"{name}: clipping never acted ({want_steps[:, 1]})"
        assert ev["val_examples"] == 101 and ev["val_confusion"] == want_ev["val_confusion"], (name, ev, want_ev)
        assert ev["val_acc"] == want_ev["val_acc"] and ev["val_macro_f1"] == want_ev["val_macro_f1"], name
        np.testing.assert_allclose(ev["val_loss"], want_ev["val_loss"], rtol=1e-5, err_msg=f"{backend} {name}")
        print(f"{backend} {name}: equals np=1 (rank {rt.rank}; losses {np.round(steps[:, 0], 4).tolist()}, "
              f"val_acc {ev['val_acc']:.3f})", flush=True)


def _evaluator_record(engine, cfg, layout, data, rt, be):
    """On rank 0, an evaluator's record (finetune.ClassifyEvaluator) of the engine's weights,
    gathered and flattened as trainer rank 0 sends a snapshot (strategies/roles.py) and loaded into
    a one-rank engine as the evaluator's own; None on the other ranks (they join the gather)."""
    import dataclasses

    from hvdllm import task
    from hvdllm.finetune import ClassifyEvaluator
    from hvdllm.parallelize import build_solo_engine
    from hvdllm.strategies import param_server
    full = engine.full_params()   # collective over the pipeline: the stages' parts to rank 0
    if layout.rank != 0:
        return None
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, plot=False))
    solo = build_solo_engine(cfg, rt, be, ranks=[rt.rank])
    solo.set_flat_params(param_server.flat_layout(task.model_config(cfg)).flatten(full))
    return ClassifyEvaluator(cfg, layout, None, solo, data).work(STEPS)


def main():
    sys.path.insert(0, str(ROOT))
    from hvdllm import backends, runtime
    for backend in BACKENDS:
        be = backends.load(backend)
        if backend == "tensorflow":   # each engine traces its own functions: retracing is expected
            import tensorflow as tf
            tf.get_logger().setLevel("ERROR")
        rt = runtime.start(be, groups=[(0,), (1,)])   # one-rank sets for the np=1 references
        _check(backend, rt, be, sys.argv[1])
        # no rank may leave while another still talks to Horovod (its last one-rank allreduce):
        # Horovod shuts down for everyone when the first process exits
        be.Collectives().barrier()


if __name__ == "__main__":
    main()
