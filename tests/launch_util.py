"""Run a command under mpirun / horovodrun from a test, with a hard deadline (never hang CI);
the tiny training run the integration tests share (TINY, train) and the comparison of two runs'
metrics (same_run)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
              "OMPI_MCA_mpi_yield_when_idle": "1", "PYTHONUNBUFFERED": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def mpirun_argv(np_: int) -> list[str]:
    return ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none",
            "-x", "OMPI_MCA_mpi_yield_when_idle=1", "-x", "PYTHONPATH",
            "-x", "TF_CPP_MIN_LOG_LEVEL"]


def horovodrun_argv(np_: int) -> list[str]:
    return [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_), "--gloo"]


def run(argv: list[str], timeout: float, cwd=ROOT, **extra_env) -> subprocess.CompletedProcess:
    """Run argv in its own process group; past `timeout` the whole group is killed and the
    test fails with what was printed, instead of hanging the suite."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(argv)}\n{out[-4000:]}")
    # whatever the launch left behind in its group (an elastic worker the driver started as the
    # job ended, a rank that outlived mpirun) would take cores from the tests after it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    log_launch(argv, time.monotonic() - t0)
    return subprocess.CompletedProcess(argv, p.returncode, out, "")


def log_launch(argv, seconds: float) -> None:
    """With HVDLLM_TEST_LAUNCH_LOG=file: one JSON line per launch (test, seconds, command), to
    see where the suite's time goes (each launch pays the imports of torch/TF/Horovod)."""
    path = os.environ.get("HVDLLM_TEST_LAUNCH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                                "s": round(seconds, 2), "argv": " ".join(map(str, argv[:3]))}) + "\n")


def hvdllm(np_: int, args: list[str], timeout: float = 300, launcher: str = "mpirun", **extra_env):
    prog = [sys.executable, "-m", "hvdllm", *args]
    pre = mpirun_argv(np_) if launcher == "mpirun" else horovodrun_argv(np_)
    return run(pre + prog, timeout, **extra_env)


# -- the integration tier's tiny training run -----------------------------------------------------
TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "data.max_bytes=400000", "train.steps=6", "train.eval_every=3", "train.eval_batches=2",
        "train.threads=1", "train.sample_tokens=8", "train.progress=false", "optim.warmup_steps=2",
        "train.checkpoint_every=3", "optim.lr=3e-3", "train.plot=false"]
# train.plot=false: matplotlib's import and one figure cost more than the tiny run's steps; the
# plot is tested once (test_integration.py)


def train(tmp_path, name, np_=1, sets=(), launcher="mpirun", timeout=300):
    """`hvdllm train` of TINY with `sets` on np_ ranks, into tmp_path/name: (result, run folder)."""
    out = Path(tmp_path) / name
    args = ["train"] + [a for kv in [*TINY, f"train.out_dir={out}", *sets] for a in ("--set", kv)]
    r = hvdllm(np_, args, timeout=timeout, launcher=launcher)
    return r, out


def records(out) -> list[dict]:
    from hvdllm import metrics
    return [r for r in metrics.read(Path(out) / "metrics.jsonl") if "role" not in r]


def losses(out, key="loss"):
    """The trainers' per-step values of `key` (loss, grad_norm, val_loss, ...), in step order."""
    return np.array([r[key] for r in records(out) if key in r])


def by_step(out, key) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(out) if key in r}


def same_fp16_run(got, ref, rtol=2e-2, what=""):
    """fp16 runs alike: losses and validation to rtol, the same steps skipped with the same loss
    scales, the finite gradient norms to rtol (a skipped step's norm is inf or nan, as the
    overflow's arithmetic went: only its being non-finite is compared)."""
    same_run(got, ref, rtol, keys=("loss", "val_loss"), what=what)
    for key in ("skipped", "loss_scale"):
        assert list(losses(got, key)) == list(losses(ref, key)), f"{what}: {key}"
    g, w = losses(got, "grad_norm"), losses(ref, "grad_norm")
    assert list(np.isfinite(g)) == list(np.isfinite(w)) == [not s for s in losses(ref, "skipped")], (what, g, w)
    np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], rtol=rtol, err_msg=f"{what}: grad_norm")


def same_run(got, ref, rtol, keys=("loss", "grad_norm", "val_loss"), steps=None, scale=None, what=""):
    """`got` trained like `ref`: for each key the same steps were logged (or at least `steps`,
    if given) and the values agree to rtol. The gradient norm is logged before clipping, so it
    shows a wrong gradient scale that clipping and Adam's scale invariance hide from the loss.
    scale: {key: factor} expected got/ref ratios (e.g. grad_norm x2 for op=sum over 2 ranks)."""
    for key in keys:
        g, w = by_step(got, key), by_step(ref, key)
        want_steps = sorted(w) if steps is None else sorted(s for s in steps if key != "val_loss" or s in w)
        assert want_steps, f"{what}: {ref} logged no {key}"
        assert set(want_steps) <= set(g) and (steps is not None or sorted(g) == want_steps), \
            f"{what}: {key} logged at steps {sorted(g)}, expected {want_steps}"
        f = (scale or {}).get(key, 1.0)
        np.testing.assert_allclose([g[s] for s in want_steps], [f * w[s] for s in want_steps], rtol=rtol,
                                   err_msg=f"{what}: {key} at steps {want_steps}")


def same_checkpoint(got, ref, step: int, tol: float = 1e-3, what=""):
    """The checkpoint `got` saved at `step` holds what `ref`'s does (whatever layouts wrote them):
    the same arrays (parameters, AdamW moments, optim.step) with the same whole shapes, equal
    within tol of each array's largest magnitude. (Elements whose gradient is zero up to
    rounding, e.g. attention's key bias, are moved by Adam's normalised noise: ~1e-4 of the
    array's scale after 3 steps between layouts; a missing, misplaced or stale piece is O(1).)"""
    from hvdllm import checkpoint
    a, meta_a = checkpoint.load(Path(got) / "checkpoints" / f"step_{step:08d}")
    b, meta_b = checkpoint.load(Path(ref) / "checkpoints" / f"step_{step:08d}")
    assert meta_a["step"] == meta_b["step"] == step, (meta_a["step"], meta_b["step"])
    assert sorted(a) == sorted(b), f"{what}: arrays {sorted(set(a) ^ set(b))} in one checkpoint only"
    for k in b:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, f"{what}: {k} has shape {x.shape}, expected {y.shape}"
        if y.dtype.kind in "iub":
            np.testing.assert_array_equal(x, y, err_msg=f"{what}: {k}")
            continue
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        worst = float(np.max(np.abs(x.astype(np.float64) - y))) if y.size else 0.0
        assert worst <= tol * max(scale, 1e-12), f"{what}: {k} differs by {worst:.3g} (its scale {scale:.3g})"


def pattern_batches(n: int, batch: int, t: int):
    """n (x, y) batches of sequences that count up by a per-sequence stride mod 16 (bytes 65..80):
    learnable in a few hundred steps, so two precisions' runs can be compared after learning."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        start, stride = rng.integers(0, 16, (batch, 1)), rng.integers(1, 4, (batch, 1))
        seq = (start + stride * np.arange(t + 1)) % 16 + 65
        yield seq[:, :-1], seq[:, 1:]
