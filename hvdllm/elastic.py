"""Horovod elastic training (train.elastic, `hvdllm launch --elastic`): under `horovodrun
--gloo --min-np A --max-np B --host-discovery-script S` a worker that dies is dropped and the
others continue from the last committed state; a worker that (re)joins gets that state.

What is committed: the engine's state_dict (whole parameters, AdamW moments, optim.step) as
numpy arrays, and the trainer's step -- in host memory, every train.elastic_commit_every steps,
through Horovod's State API (NumpyState below; horovod.torch's TorchState and Keras' state do
not apply: the engine's state is numpy either way, and Keras 3 breaks Horovod's Keras state).

A resize, step by step (horovod/common/elastic.py run_fn is the loop):
  1. a lost worker makes a collective on every survivor raise HorovodInternalError (Gloo's
     recv timeout, HOROVOD_GLOO_TIMEOUT_SECONDS); added hosts make the next commit raise
     HostsUpdatedInterrupt on every worker at the same step;
  2. lost worker: restore() rolls the step back to the last commit;
  3. Horovod is shut down and initialised again (new rank and size); reset() then updates the
     Runtime and rebuilds the layout, the engine over the new global set and the sampler --
     a rebuild rather than patching the old engine, because the engine caches its dp size
     (gradient averaging, ZeRO ranges) and its framework's compiled steps hold the old Horovod;
  4. sync() broadcasts the committed arrays from rank 0 (a newcomer gets them), and the loop
     continues from the committed step with the engine loaded from them.

Sample order after a resize: train.batch_size stays per rank, so the global batch becomes the
new dp x batch_size; step s reads data.Sampler's batch s for the new dp (disjoint slices of
that step's global batch). The steps continue and the run ends at train.steps with its final
checkpoint, but no sample-exact equivalence with an unresized run is claimed after a resize;
before it the run is exactly the non-elastic run with the same settings.

Tested: a lost worker (tests/integration/test_elastic.py, both frameworks). A worker that comes
back (horovodrun --blacklist-cooldown-range, or a host the discovery script adds again) starts
the resize and the sync, but on one machine Horovod 0.28.1's re-initialisation then loops: one
process waits in Gloo's rendezvous for a local process set and the others reset again at the same
step. Rejoining is therefore not claimed yet.

Only data parallelism: one state every rank holds whole, one global process set (validated in
`problems`). The framework's Horovod module is imported only inside functions (the core never
imports a framework at module level).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from . import metrics

# the Horovod module whose init / shutdown / elastic exceptions match each backend's Horovod
HOROVOD = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}
# marker written before the injected kill (train.fail_mode='kill'): a worker that rejoins with the
# same rank, or a survivor rolled back before fail_at_step, must not kill itself again
FAIL_MARKER = "elastic_fail_injected"


def problems(cfg) -> list[str]:
    """What train.elastic cannot run with: one message per key, saying what to change."""
    if not cfg.train.elastic:
        return []
    p = cfg.parallel
    bad = [(k, v) for k, v, on in (("parallel.pp", p.pp, p.pp > 1), ("parallel.tp", p.tp, p.tp > 1),
                                   ("parallel.dp", p.dp, p.dp != 0), ("parallel.zero", p.zero, p.zero),
                                   ("ps.servers", cfg.ps.servers, cfg.ps.servers),
                                   ("roles.evaluators", cfg.roles.evaluators, cfg.roles.evaluators),
                                   ("roles.generators", cfg.roles.generators, cfg.roles.generators),
                                   ("localsgd.every", cfg.localsgd.every, cfg.localsgd.every),
                                   ("model.layers", "a layer list", bool(cfg.model.layers))) if on]
    out = [f"train.elastic: runs plain data parallelism only (every rank a dp rank holding the whole "
           f"state, parallel.dp = 0 so it follows the world size); {k} = {v!r} is not supported, "
           f"unset it or set train.elastic = false" for k, v in bad]
    if cfg.train.elastic_commit_every < 1:
        out.append(f"train.elastic_commit_every: must be >= 1 (steps between in-memory commits), "
                   f"got {cfg.train.elastic_commit_every}")
    return out


def _log(msg: str) -> None:
    print(f"[hvdllm] {msg}", file=sys.stderr, flush=True)


def should_fail(trainer, step: int) -> bool:
    """train.fail_at_step under elastic: once per run folder (the marker), on fail_rank."""
    t = trainer.cfg.train
    marker = Path(t.out_dir) / FAIL_MARKER
    if step != t.fail_at_step or trainer.rt.rank != t.fail_rank or marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {trainer.rt.rank} at step {step}\n")
    return True


def _state_state(engine, step: int) -> dict:
    """The engine's state as numpy copies (the engine's arrays may share its tensors' memory)."""
    return {"step": int(step), "arrays": {k: np.array(v, copy=True) for k, v in engine.state_dict().items()}}


def make_state(trainer):
    """A Horovod State over the trainer's numpy state (subclassed here: common.elastic must be
    imported after the framework's Horovod)."""
    import importlib

    from horovod.common.elastic import State
    hvd = importlib.import_module(HOROVOD[trainer.cfg.backend])

    class NumpyState(State):
        def __init__(self):
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
            self.step = trainer.start_step
            self._saved = _state_state(trainer.engine, self.step)
            self.resets, self.event = 0, None

        def save(self):
            self._saved = _state_state(trainer.engine, self.step)

        def restore(self):
            # run_fn calls this on HorovodInternalError, from the loop or from sync (outside the
            # loop's wrapper, which names the event); the arrays go into the rebuilt engine in body
            self.event = self.event or "a worker was lost"
            self.step = self._saved["step"]

        def sync(self):
            """Rank 0's committed state to every worker with the backend's collectives: one
            broadcast per dtype of the arrays laid end to end (per array, TensorFlow would trace
            a function for each shape). A newcomer lays out its own engine's arrays: same config."""
            coll = trainer.backend.NumpyCollectives(trainer.backend.Collectives())
            step = coll.broadcast(np.array([self._saved["step"]], np.int64), root=0, name="elastic.step")
            by_dtype: dict = {}
            for k in sorted(self._saved["arrays"]):
                a = np.asarray(self._saved["arrays"][k])
                by_dtype.setdefault(a.dtype, []).append((k, a))
            arrays = {}
            for dtype, group in sorted(by_dtype.items(), key=lambda kv: kv[0].str):
                flat = coll.broadcast(np.concatenate([a.reshape(-1) for _, a in group]), root=0,
                                      name=f"elastic.{dtype.name}")
                flat, at = np.asarray(flat, dtype=dtype), 0
                for k, a in group:   # shapes kept: a 0-d optim.step too
                    arrays[k] = flat[at:at + a.size].reshape(a.shape).copy()
                    at += a.size
            self._saved = {"step": int(step[0]), "arrays": arrays}
            self.step = self._saved["step"]

        def reset(self):
            self.resets += 1
            before = trainer.rt.size
            rebuild(trainer, hvd)   # Horovod was initialised again: new rank, size, engine
            if trainer.rt.rank == 0:
                _log(f"elastic: resized from {before} to {trainer.rt.size} workers ({self.event}); "
                     f"continuing from the commit at step {self.step} (reset {self.resets})")
            self.event = None

        def commit_due(self, done: int) -> None:
            self.step = done
            if done % trainer.cfg.train.elastic_commit_every == 0 or done == trainer.cfg.train.steps:
                self.commit()   # also raises HostsUpdatedInterrupt when hosts were added

    return hvd, NumpyState()


def run(trainer, loop):
    """trainer's loop under hvd.elastic.run: restarted from the last commit after each resize."""
    hvd, state = make_state(trainer)
    trainer.on_step = state.commit_due

    @_elastic_run(trainer.cfg.backend, hvd)
    def body(state):
        trainer.engine.load_state_dict(state._saved["arrays"])
        trainer.start_step = state.step
        if state.resets and trainer.is_root:   # the steps after the commit are logged again
            if getattr(trainer, "log", None) is not None:
                trainer.log.close()
            trainer.log = metrics.MetricsLog(trainer.out, state.step)
        return loop()
    return body(state)


def _elastic_run(backend: str, hvd):
    """hvd.elastic.run (horovod/common/elastic.py run_fn: sync, run, and on a resize restore or
    not, re-initialise Horovod, reset, again), noting which event caused each reset for the log,
    and with TensorFlow's op errors from a lost peer recognised: horovod.tensorflow.elastic.run
    turns only HorovodAllreduce/Allgather/Broadcast failures into HorovodInternalError and
    returns None for any other (a grouped allreduce's 'HorovodGroupedAllreduce' among them),
    so a resize would end the run as if it were done."""
    from horovod.common.elastic import run_fn
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

    def reset():   # what horovod.{torch,tensorflow}.elastic do: a new Horovod over the new workers
        hvd.shutdown()
        hvd.init()

    def decorate(func):
        op_error = ()
        if backend == "tensorflow":
            import tensorflow as tf
            op_error = tf.errors.OpError

        def wrapper(state, *args, **kwargs):
            try:
                return func(state, *args, **kwargs)
            except HorovodInternalError:
                state.event = "a worker was lost"
                raise
            except HostsUpdatedInterrupt as e:
                state.event = "hosts were removed" if e.skip_sync else "hosts were added"
                raise
            except op_error as e:
                if "Horovod" not in str(e):
                    raise
                state.event = "a worker was lost"
                raise HorovodInternalError(e) from e
        return run_fn(wrapper, reset)
    return decorate


def rebuild(trainer, hvd) -> None:
    """After Horovod's re-initialisation: the Runtime's rank and size, the layout, a new engine
    over the global set (its weights are loaded from the commit next) and the sampler."""
    from .layout import Layout
    from .parallelize import build_engine
    rt = trainer.rt
    rt.rank, rt.size, rt.local_rank, rt.local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()
    rt.process_sets = {}   # dp only: every collective is on the global set, which init re-made
    trainer.layout = Layout.from_config(trainer.cfg, rt.size, rt.rank)
    trainer.is_root = rt.rank == 0
    trainer.engine = build_engine(trainer.cfg, trainer.layout, rt, trainer.backend)
    trainer.sampler = trainer.make_sampler()


def discovery_script(path: Path, slots: int) -> Path:
    """A host-discovery script for one machine: `slots` names that all resolve to it, one slot
    each. Not `localhost:N`: Horovod blacklists a whole host when one of its workers fails, so
    on a single host the first lost worker would end the job (horovod/runner/elastic/
    registration.py: every host blacklisted -> stop)."""
    names = ["localhost", "127.0.0.1", os.uname().nodename]
    lines = [f"echo {names[i]}:1" for i in range(min(slots, len(names)))]
    if slots > len(names):   # more local workers than local names: the rest share the last one
        lines[-1] = f"echo {names[-1]}:{slots - len(names) + 1}"
    path.write_text("#!/bin/sh\n# hvdllm launch --elastic: this machine's workers (hvdllm/elastic.py)\n"
                    + "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


RESET_LIMIT = 8   # resizes a job may go through (horovodrun --reset-limit)


def command(np_: int, args: list[str], min_np: int | None = None, max_np: int | None = None,
            discovery: str | None = None) -> list[str]:
    """`hvdllm launch --elastic`: horovodrun's elastic Gloo mode, starting np_ workers, going on
    with no fewer than min_np and taking up to max_np. Without a discovery script, this machine's
    (discovery_script) on the loopback interface: Horovod's own interface detection needs two
    hosts to start an elastic job (horovod/runner/gloo_run.py _get_min_start_hosts)."""
    import tempfile
    min_np, max_np = min_np or np_, max_np or np_
    cmd = ["horovodrun", "-np", str(np_), "--gloo", "--min-np", str(min_np), "--max-np", str(max_np),
           # a resize that never settles (Horovod 0.28.1's rejoin loops, see above) ends the job
           # after this many resets, instead of running forever
           "--reset-limit", str(RESET_LIMIT)]
    if discovery is None:
        path = Path(tempfile.mkdtemp(prefix="hvdllm-elastic-")) / "hosts.sh"
        cmd += ["--host-discovery-script", str(discovery_script(path, max_np)), "--network-interface", "lo"]
    else:
        cmd += ["--host-discovery-script", discovery]
    if args[:1] == ["train"] and "train.elastic=true" not in args:
        args = [*args, "--set", "train.elastic=true"]
    return cmd + [sys.executable, "-m", "hvdllm", *args]
