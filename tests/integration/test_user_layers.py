"""Issue 4: a user's ordered layer list (model.layers, hvdllm/user_model.py) trains under DP x PP in
both backends and reproduces the single-process run of the same layers, data and seed. Issue 5:
the same under tensor parallelism by a plan (model.tp_plan), alone and with DP or PP."""
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from launch_util import by_step, losses, same_checkpoint, same_fp16_run, same_run, train

from hvdllm import checkpoint, config, user_model
from hvdllm.errors import ConfigError

MODELS = Path(__file__).resolve().parents[1] / "user_models.py"
BUILDER = {"torch": f"{MODELS}:torch_lm", "tensorflow": f"{MODELS}:keras_lm"}
BACKENDS = list(BUILDER)


def sets(backend, *extra):
    # n_layer=2 blocks: 5 layers (embedding, 2 blocks, final LayerNorm, head): uneven on 2 stages
    return [f"backend={backend}", f"model.layers={BUILDER[backend]}", *extra]


def parts(stdout: str) -> list[int]:
    m = re.search(r"5 layers, \d+ parameters, per pipeline part \[([\d, ]+)\]", stdout)
    assert m, stdout[-3000:]
    return [int(n) for n in m.group(1).split(",")]


# -- unit tier: no processes ---------------------------------------------------------------------

def test_config_rules_name_model_layers():
    config.validate(config.load(None, [f"model.layers={BUILDER['torch']}", "parallel.pp=2"]), world_size=2)
    cfg = config.load(None, ["model.layers=no_colon", "parallel.zero=1"])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    msg = str(e.value)
    assert "model.layers: 'no_colon' is not 'module:function'" in msg
    assert "parallel.zero: ZeRO-1 is not wired for model.layers; set parallel.zero = 2" in msg
    config.validate(config.load(None, [f"model.layers={BUILDER['torch']}", "parallel.zero=3"]), world_size=2)
    for extra, want in ((["parallel.tp=2", "model.tp_plan=*.fc=column"], "parallel.tp: ZeRO-2 over model.layers "
                         "runs without tensor parallelism; set parallel.tp = 1"),
                        (["parallel.pp=2"], "parallel.pp: ZeRO-2 over model.layers runs without pipeline stages")):
        with pytest.raises(ConfigError, match=re.escape(want)):
            config.validate(config.load(None, [f"model.layers={BUILDER['torch']}", "parallel.zero=2", *extra]), 2)


# torch_lm's module paths as torch_backend/user_tp.modules (and tf_backend's for keras_lm) give
# them: (in, out) for a Linear / Dense, None for anything else
LM_MODULES = {"0": None, "0.tok": None, "0.pos": None, **{k: v for b in ("1", "2") for k, v in {
    b: None, f"{b}.ln": None, f"{b}.fc": (32, 128), f"{b}.proj": (128, 32), f"{b}.mix": (32, 32)}.items()},
    "3": None, "4": (32, 256)}


def test_tp_plan_rules_name_model_tp_plan():
    plan = "model.tp_plan=*.fc=column, *.proj=row"
    config.validate(config.load(None, [f"model.layers={BUILDER['torch']}", "parallel.tp=2", plan]), world_size=2)
    config.validate(config.load(None, [f"model.layers={BUILDER['torch']}", plan]), world_size=1)  # tp=1: no-op
    for sets, want in (([f"model.layers={BUILDER['torch']}", "parallel.tp=2"], "parallel.tp=2 with model.layers "
                        "needs a plan naming the Linear / Dense modules to split"),
                       ([plan], "applies to a user's layer list (model.layers); the built-in GPT has its own"),
                       ([f"model.layers={BUILDER['torch']}", "model.tp_plan=*.fc=diagonal, 1.proj"],
                        "'*.fc=diagonal': unknown style 'diagonal'; use column, row or replicate")):
        with pytest.raises(ConfigError) as e:
            config.validate(config.load(None, sets))
        assert all(p.startswith("model.tp_plan: ") for p in e.value.problems), e.value.problems
        assert want in str(e.value), str(e.value)
    assert "'1.proj' is not 'pattern=style'" in str(e.value)
    # the rules that need the built model (the engines call resolve_plan / check_output)
    assert user_model.resolve_plan("*.fc=column, *.proj=row, *=replicate", LM_MODULES, 2, "nn.Linear") == \
        {"1.fc": "column", "1.proj": "row", "2.fc": "column", "2.proj": "row"}
    assert user_model.resolve_plan("1.*=replicate, *.fc=column, *.proj=row", LM_MODULES, 2, "x") == \
        {"2.fc": "column", "2.proj": "row"}   # the first matching entry decides
    with pytest.raises(ConfigError) as e:
        user_model.resolve_plan("*.ln=column, *.fc=column, 4=row, *.attn=row", LM_MODULES, 3, "nn.Linear")
    assert e.value.problems == [
        "model.tp_plan: '*.attn' matches no module; the paths are e.g. 0, 0.tok, 0.pos, 1, 1.ln, 1.fc, "
        "1.proj, 1.mix, 2, 2.ln, 2.fc, 2.proj ...",
        "model.tp_plan: '1.ln' (column) is not a nn.Linear", "model.tp_plan: '2.ln' (column) is not a nn.Linear",
        "model.tp_plan: '1.fc' (column): its 128 output features are not divisible by parallel.tp=3",
        "model.tp_plan: '2.fc' (column): its 128 output features are not divisible by parallel.tp=3",
        "model.tp_plan: '4' (row): its 32 input features are not divisible by parallel.tp=3"]
    with pytest.raises(ConfigError, match=r"model.tp_plan: layer 1 returns shape \(2, 64\) under the plan"):
        user_model.check_output(1, np.zeros((2, 64)), np.zeros((2, 128)))
    # where the slices sit: torch weights are (out, in), Keras kernels (in, out)
    assert user_model.split_placement("column", "weight", 0, 2, 1)["axis"] == 0
    assert user_model.split_placement("row", "weight", 0, 2, 1)["axis"] == 1
    assert user_model.split_placement("column", "weight", 1, 2, 1)["axis"] == 1
    assert user_model.split_placement("row", "bias", 1, 2, 1) is None


def test_builder_import_errors_are_one_line_and_name_the_key(tmp_path):
    for spec, want in (("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                       (f"{MODELS}:nope", "has no function 'nope'"),
                       (f"{tmp_path}/missing.py:f", "no file")):
        with pytest.raises(ConfigError) as e:
            user_model.load_builder(spec)
        (line,) = e.value.problems
        assert line.startswith("model.layers: ") and want in line and "\n" not in line
    cfg = config.load(None, [f"model.layers={MODELS}:broken"])
    with pytest.raises(ConfigError, match=r"model.layers: the builder .* raised RuntimeError: weights file"):
        user_model.build(cfg.model, 0, lambda s: None)


def test_names_and_partition_helpers():
    assert user_model.unique_names(3, ["kernel", "bias", "kernel", "bias", "gamma"]) == \
        ["3.kernel", "3.bias", "3.kernel_1", "3.bias_1", "3.gamma"]
    with pytest.raises(ConfigError, match="share a parameter"):
        user_model.check_not_shared({1: [0], 2: [0, 4]})
    # 5 layers, 2 stages: uneven, every layer once (partition.check), parts never empty
    assert user_model.split([1, 1, 1, 1, 1], 2, "uniform", None, None) == [(0, 2), (2, 5)]
    assert user_model.split([9, 9, 9, 1, 8], 2, "params", None, None) == [(0, 2), (2, 5)]
    rt = types.SimpleNamespace(rank=0, comm=types.SimpleNamespace(bcast=lambda obj, root: obj))
    assert user_model.split([1] * 5, 2, "time", rt, lambda: [1, 1, 1, 9, 1]) == [(0, 3), (3, 5)]
    with pytest.raises(ConfigError, match="model.layers: 5 layers cannot fill 6 pipeline parts"):
        user_model.split([1] * 5, 6, "uniform", None, None)


# -- integration tier: hvdllm train under mpirun ------------------------------------------------

@pytest.fixture
def user_ref(reference):
    """user_ref(backend): the np=1 run of the same layers (shared by the session)."""
    def get(backend):
        d = reference(*sets(backend, "train.batch_size=8"))
        assert len(losses(d)) == 6 and losses(d)[-1] < losses(d)[0]
        return d
    return get


# (ranks, settings, expected layers per pipeline part or None, backends)
CASES = {
    "pp2": (2, ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8"], [2, 3], BACKENDS),
    "dp2xpp2": (4, ["parallel.pp=2", "parallel.microbatches=2", "train.batch_size=4"], [2, 3], BACKENDS),
    "pp2-time-gpipe": (2, ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8",
                           "parallel.partition=time", "parallel.schedule=gpipe"], None, BACKENDS),
    "pp2-uniform-interleaved": (2, ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8",
                                    "parallel.partition=uniform", "parallel.schedule=interleaved",
                                    "parallel.virtual_stages=2"], [1, 1, 1, 2], BACKENDS),
}


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_user_layers_pipeline_equals_single_process(tmp_path, user_ref, backend, case):
    """...and the gathered checkpoints hold every '{layer}.{name}' parameter and moment: they are
    the np=1 run's checkpoints, so they load at pp=1; pp2's step-3 checkpoint resumes at pp=1 for
    real and continues the same trajectory."""
    np_, extra, split, _ = CASES[case]
    ref = user_ref(backend)
    r, d = train(tmp_path, case, np_, sets(backend, *extra))
    assert r.returncode == 0, r.stdout[-4000:]
    got = parts(r.stdout)
    assert sum(got) == 5 and min(got) >= 1 and (split is None or got == split), got
    same_run(d, ref, rtol=1e-5, what=case)
    assert (d / "sample.txt").exists() and (d / "checkpoints" / "step_00000006" / "manifest.json").exists()
    for step in (3, 6):
        same_checkpoint(d, ref, step, what=f"{case} step {step}")
    if case != "pp2":
        return
    state, _ = checkpoint.load(d / "checkpoints" / "step_00000003")
    want = {"0.tok.weight", "0.pos.weight", "4.weight"} if backend == "torch" else \
        {"0.embeddings", "0.embeddings_1", "4.kernel"}
    assert want <= set(state), sorted(state)
    shutil.copytree(d, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    r, res = train(tmp_path, "resumed", 1, sets(backend, "train.batch_size=8", "train.resume=true"))
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 3" in r.stdout, r.stdout[-4000:]
    same_run(res, ref, rtol=1e-5, what="pp2 resumed at pp=1")


FP16 = ['train.precision="fp16"', "train.fail_at_step=1", 'train.fail_mode="overflow"']


@pytest.mark.integration
@pytest.mark.parametrize("backend,layout", [("torch", "pp2"), ("tensorflow", "dp2")])
def test_user_layers_fp16_skips_rank_1s_overflow_everywhere(tmp_path, reference, backend, layout):
    """train.precision = 'fp16' over the list (torch autocast, Keras' mixed_float16): rank 1's
    gradients overflow at step 2 (the last stage's under pp2, the second replica's under dp2); the
    job-wide norm makes every rank skip it and halve the scale. Equal to np=1 in fp16 with the
    overflow there (2e-2, the precision table's tolerance), the same skipped step and scales."""
    ref = reference(*sets(backend, "train.batch_size=8", *FP16, "train.fail_rank=0"))
    extra = ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8"] if layout == "pp2" \
        else ["train.batch_size=4"]
    r, d = train(tmp_path, layout, 2, sets(backend, *extra, *FP16, "train.fail_rank=1"))
    assert r.returncode == 0, r.stdout[-4000:]
    same_fp16_run(d, ref, what=f"fp16 {layout}")
    assert list(losses(ref, "skipped")) == [False, True] + [False] * 4
    assert list(losses(ref, "loss_scale")) == [2.0 ** 16] + [2.0 ** 15] * 5


@pytest.mark.integration
def test_builder_that_raises_gives_one_line_naming_model_layers(tmp_path):
    r, out = train(tmp_path, "broken", 1, [f"model.layers={MODELS}:broken"], timeout=120)
    assert r.returncode == 2, r.stdout[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "model.layers:" in ln]
    assert lines and "raised RuntimeError: weights file /nonexistent/w.bin not found" in lines[0], r.stdout[-3000:]
    assert "Traceback" not in r.stdout


# -- tensor parallelism by model.tp_plan (the same plan for torch_lm and keras_lm) ---------------
PLAN = "model.tp_plan=*.fc=column, *.proj=row"
TP_CASES = {
    "dp2xtp2": (4, ["parallel.tp=2", "train.batch_size=4", PLAN]),
    "pp2xtp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=4", "train.batch_size=8", PLAN]),
}


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TP_CASES))
def test_user_layers_tensor_parallel_equals_single_process(tmp_path, user_ref, backend, case):
    np_, extra = TP_CASES[case]
    r, d = train(tmp_path, case, np_, sets(backend, *extra))
    assert r.returncode == 0, r.stdout[-4000:]
    assert "tp=2 (*.fc=column, *.proj=row)" in r.stdout, r.stdout[-3000:]
    same_run(d, user_ref(backend), rtol=1e-5, what=case)
    for step in (3, 6):   # the slices, assembled, are the np=1 run's checkpoint
        same_checkpoint(d, user_ref(backend), step, what=f"{case} step {step}")
    assert (d / "sample.txt").exists()


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_checkpoint_resumes_at_tp1(tmp_path, user_ref, backend):
    """tp=2 reproduces the single process; its checkpoint holds the split parameters and AdamW
    moments as slices with their placements, and resumes at tp=1."""
    ref = user_ref(backend)
    r, d = train(tmp_path, "tp", 2, sets(backend, "parallel.tp=2", "train.batch_size=8", PLAN))
    assert r.returncode == 0, r.stdout[-4000:]
    same_run(d, ref, rtol=1e-5, what="tp2")
    tp2 = {k: by_step(d, k) for k in ("loss", "grad_norm")}
    arrays = checkpoint.Sharded(d / "checkpoints" / "step_00000003").arrays
    # torch Linear weights are (out, in), Keras Dense kernels (in, out): fc = column, proj = row
    fc, proj, proj_bias = (("1.fc.weight", 0), ("1.proj.weight", 1), "1.proj.bias") if backend == "torch" else \
        (("1.kernel", 1), ("1.kernel_1", 0), "1.bias_1")
    for name, axis in (fc, proj):
        for n in (name, f"optim.m.{name}", f"optim.v.{name}"):
            assert [pl["axis"] for _, pl in arrays[n]["shards"]] == [axis, axis], (n, arrays[n])
    assert [pl for _, pl in arrays[proj_bias]["shards"]] == [None, None]
    # drop the last checkpoint; resume from step 3 in one process, without tensor parallelism
    shutil.rmtree(d / "checkpoints" / "step_00000006")
    r, _ = train(tmp_path, "tp", 1, sets(backend, "train.batch_size=8", "train.resume=true", PLAN))
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 3" in r.stdout, r.stdout[-4000:]
    assert len(losses(d)) == 6
    # step 4 is the first loss from the loaded weights: it matches the tp=2 run's to float noise
    # (its gradient norm too: the loaded weights are the same weights).
    for key in ("loss", "grad_norm"):
        got = by_step(d, key)
        np.testing.assert_allclose([got[s] for s in (1, 2, 3, 4)], [tp2[key][s] for s in (1, 2, 3, 4)], rtol=1e-6,
                                   err_msg=key)
    # Later steps go through AdamW updates computed by other float32 sums (a whole Linear where
    # tp=2 had two halves): ~1e-7 differences in near-zero gradients grow to ~1e-5 over two
    # steps, as they do between any two layouts; loaded moments that were wrong would be 1e-2 off.
    same_run(d, ref, rtol=1e-4, what="tp2 resumed at tp=1")


# -- ZeRO-2 / ZeRO-3 over the list: one unit per layer (strategies/zero_layers.py) ---------------
CLIP = "optim.grad_clip=3.0"   # binds in the first steps only: both regimes in one run (asserted)


@pytest.fixture
def zero_ref(reference):
    """zero_ref(backend): the np=1 ZeRO-0 run of the list, clipping at 3.0, shared by the session."""
    def get(backend):
        d = reference(*sets(backend, "train.batch_size=8", CLIP))
        norms = losses(d, "grad_norm")
        assert norms.max() > 3.0 > norms.min(), norms   # some steps clipped, some not
        return d
    return get


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_user_layers_zero3_equals_single_process_and_resumes(tmp_path, zero_ref, backend):
    """ZeRO-3 at np=2 reproduces the np=1 data-parallel run of the same layers (losses, gradient
    norms with and without clipping binding, validation); its checkpoint (each rank's ranges of
    every '{layer}.{name}' and its moments) is the np=1 run's, and from its step 3 the np=1
    ZeRO-0 engine resumes for real and continues the same trajectory."""
    ref = zero_ref(backend)
    r, d = train(tmp_path, "zero3", 2, sets(backend, "parallel.zero=3", "train.batch_size=4", CLIP))
    assert r.returncode == 0, r.stdout[-4000:]
    assert "5 layers in 5 ZeRO-3 units" in r.stdout and "zero=3 dp=2" in r.stdout, r.stdout[-3000:]
    same_run(d, ref, rtol=1e-5, what="zero3")
    for step in (3, 6):
        same_checkpoint(d, ref, step, what=f"zero3 step {step}")
    assert (d / "sample.txt").exists()
    shutil.rmtree(d / "checkpoints" / "step_00000006")
    r, _ = train(tmp_path, "zero3", 1, sets(backend, "train.batch_size=8", CLIP, "train.resume=true"))
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 3" in r.stdout, r.stdout[-4000:]
    same_run(d, ref, rtol=1e-5, what="zero3 resumed at np=1 zero=0")


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_user_layers_zero2_with_accumulation_equals_single_process(tmp_path, zero_ref, backend):
    """ZeRO-2 at np=2 with 2 accumulated micro-batches of 2 (each unit reduce-scattered per
    micro-batch) reproduces the same np=1 run's losses and gradient norms: 8 windows a step
    either way."""
    r, d = train(tmp_path, "zero2", 2, sets(backend, "parallel.zero=2", "train.batch_size=2",
                                            "aggregation.accumulation=2", CLIP))
    assert r.returncode == 0, r.stdout[-4000:]
    assert "5 layers in 5 ZeRO-2 units" in r.stdout, r.stdout[-3000:]
    # (validation is over train.eval_batches batches of dp x train.batch_size windows: 4 here, 8
    # in the reference, so only the training trajectory compares)
    same_run(d, zero_ref(backend), rtol=1e-5, keys=("loss", "grad_norm"), what="zero2 accumulation 2")
