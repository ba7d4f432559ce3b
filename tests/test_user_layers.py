"""Issue 4: a user's ordered layer list (model.layers, hvdllm/user_model.py) trains under DP x PP in
both backends and reproduces the single-process run of the same layers, data and seed."""
import re
import types
from pathlib import Path

import numpy as np
import pytest

from hvdllm import config, user_model
from hvdllm.errors import ConfigError
from test_integration import losses, train

MODELS = Path(__file__).resolve().parent / "user_models.py"
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
    cfg = config.load(None, ["model.layers=no_colon", "parallel.tp=2", "parallel.zero=1"])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    msg = str(e.value)
    assert "model.layers: 'no_colon' is not 'module:function'" in msg
    assert "parallel.tp: not combinable with model.layers" in msg and "parallel.zero" in msg


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

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for backend in BACKENDS:
        r, d = train(tmp, backend, 1, sets(backend, "train.batch_size=8"))
        assert r.returncode == 0, r.stdout[-4000:]
        assert "5 layers" in r.stdout and len(losses(d)) == 6 and losses(d)[-1] < losses(d)[0]
        out[backend] = d
    return out


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
def test_user_layers_pipeline_equals_single_process(tmp_path, reference, backend, case):
    np_, extra, split, _ = CASES[case]
    r, d = train(tmp_path, case, np_, sets(backend, *extra))
    assert r.returncode == 0, r.stdout[-4000:]
    got = parts(r.stdout)
    assert sum(got) == 5 and min(got) >= 1 and (split is None or got == split), got
    np.testing.assert_allclose(losses(d), losses(reference[backend]), rtol=1e-5)
    np.testing.assert_allclose(losses(d, "val_loss"), losses(reference[backend], "val_loss"), rtol=1e-5)
    assert (d / "sample.txt").exists() and (d / "checkpoints" / "step_00000006.npz").exists()


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_checkpoint_resumes_without_pipeline(tmp_path, reference, backend):
    """The gathered checkpoint holds every '{layer}.{name}' parameter: it loads at pp=1."""
    r, d = train(tmp_path, "pp", 2, sets(backend, "parallel.pp=2", "parallel.microbatches=2", "train.batch_size=8"))
    assert r.returncode == 0, r.stdout[-4000:]
    state = np.load(d / "checkpoints" / "step_00000006.npz")
    want = {"0.tok.weight", "0.pos.weight", "4.weight"} if backend == "torch" else \
        {"0.embeddings", "0.embeddings_1", "4.kernel"}
    assert want <= set(state.files), sorted(state.files)
    r, _ = train(tmp_path, "pp", 1, sets(backend, "train.batch_size=8", "train.resume=true", "train.steps=7"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-4000:]


@pytest.mark.integration
def test_builder_that_raises_gives_one_line_naming_model_layers(tmp_path):
    r, out = train(tmp_path, "broken", 1, [f"model.layers={MODELS}:broken"], timeout=120)
    assert r.returncode == 2, r.stdout[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "model.layers:" in ln]
    assert lines and "raised RuntimeError: weights file /nonexistent/w.bin not found" in lines[0], r.stdout[-3000:]
    assert "Traceback" not in r.stdout
