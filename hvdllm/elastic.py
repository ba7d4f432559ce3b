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

Sample order after a resize: with train.elastic_global_batch = G the global batch stays G
sequences and each of the `size` workers takes G / size of them (config.resolve, rebuild): step s
trains on data.Sampler's slice s of G windows whatever the size, so every step computes what one
process with batch G does, before and after any resize. Without it (0) train.batch_size stays
per worker, the global batch becomes the new size x batch_size, and no equivalence with an
unresized run is claimed after a resize.

A worker that comes back: Horovod blacklists a host whose worker failed; with horovodrun
--blacklist-cooldown-range (hvdllm launch passes it on) the host may take part again after the
cooldown, the driver then notifies rank 0, the next commit raises HostsUpdatedInterrupt on every
worker, and the driver starts a new worker there. What made that fail in Horovod 0.28.1, and what
is done about it here:
  - the new worker's engine is fresh (torch's AdamW has no moments before its first step), so its
    own arrays do not match rank 0's: sync broadcasts rank 0's layout first. (A broadcast of
    another length fails on every worker as HorovodInternalError, taken for a lost worker, and the
    job reset again and again at the same step until --reset-limit.)
  - the driver starts the new worker only after the others have entered the new round, so they
    wait in hvd.init's rendezvous while it imports its framework and starts Horovod; under a short
    HOROVOD_GLOO_TIMEOUT_SECONDS every worker aborts there ("Wait timeout after N seconds for
    key(s)"). From the first resize on, init runs under train.elastic_join_timeout (Gloo has one
    timeout, so collectives use it too).
  - not worked around (horovod/runner/elastic/driver.py _update_host_assignments): a host whose
    cooldown ends before the driver's round after the failure is assigned again in that round,
    but its slot counts as still filled, so no process is started for it and the others abort in
    the rendezvous. The cooldown (twice its lower bound the first time, capped by the upper)
    must outlast that round: seconds, e.g. --blacklist-cooldown-range 10 60.
  - also upstream: rank 0 drops a host notice that arrives during a reset (State.on_reset), and
    the driver sends it only once, so a host that returns while the workers re-initialise is
    taken in only at the next resize that has another cause.

Tested (tests/integration/test_elastic.py, both frameworks): 3 workers, one killed, on with 2,
its host back after the cooldown, on with 3 (the newcomer synced from the commit), every step
equal to the one-process run with the same global batch.

Only data parallelism: one state every rank holds whole, one global process set (validated in
`problems`). The framework's Horovod module is imported only inside functions (the core never
imports a framework at module level).
"""
from __future__ import annotations

import dataclasses
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


def problems(cfg, world_size: int | None = None) -> list[str]:
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
    g = cfg.train.elastic_global_batch
    if g < 0:
        out.append(f"train.elastic_global_batch: must be >= 0 (0 = train.batch_size per worker), got {g}")
    elif g and world_size and g % world_size:
        out.append(f"train.elastic_global_batch: {g} sequences cannot be split evenly over {world_size} "
                   f"workers; choose a multiple of every world size from --min-np to --max-np")
    if not cfg.train.elastic_join_timeout > 0:
        out.append(f"train.elastic_join_timeout: must be > 0 seconds, got {cfg.train.elastic_join_timeout}")
    return out


def sized(cfg, size: int):
    """train.elastic_global_batch over `size` workers: the config with train.batch_size = global /
    size (config.resolve at start, rebuild after each resize). Unfrozen; the caller resolves it."""
    g = cfg.train.elastic_global_batch
    if not cfg.train.elastic or not g:
        return cfg
    if g % size:
        from .errors import ConfigError
        raise ConfigError(problems(cfg, size))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=g // size))


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
            self.resets, self.event, self.cause = 0, None, ""

        def save(self):
            self._saved = _state_state(trainer.engine, self.step)

        def restore(self):
            # run_fn calls this on HorovodInternalError, from the loop or from sync (outside the
            # loop's wrapper, which names the event); the arrays go into the rebuilt engine in body
            self.event = self.event or "a worker was lost"
            self.step = self._saved["step"]

        def sync(self):
            """Rank 0's committed state to every worker: first its layout (the step and each
            array's name, shape and dtype, one small pickled broadcast), then one broadcast per
            dtype of the arrays laid end to end (per array, TensorFlow would trace a function for
            each shape). The layout is rank 0's because a joining worker's own engine may hold
            less: a fresh torch AdamW has no moments before its first step, and broadcasts of
            other lengths fail on every worker -- as HorovodInternalError, taken for a lost worker,
            so each retry resets again at the same step until the reset limit ends the job."""
            root = hvd.rank() == 0
            mine = {k: np.asarray(a) for k, a in self._saved["arrays"].items()}
            step, layout = hvd.broadcast_object(
                (self._saved["step"], {k: (a.shape, a.dtype.str) for k, a in mine.items()}),
                root_rank=0, name="elastic.layout")
            coll = trainer.backend.NumpyCollectives(trainer.backend.Collectives())
            by_dtype: dict = {}
            for k in sorted(layout):
                shape, dtype = layout[k]
                by_dtype.setdefault(np.dtype(dtype), []).append((k, mine[k] if root else np.zeros(shape, dtype)))
            arrays = {}
            for dtype, group in sorted(by_dtype.items(), key=lambda kv: kv[0].str):
                flat = coll.broadcast(np.concatenate([a.reshape(-1) for _, a in group]), root=0,
                                      name=f"elastic.{dtype.name}")
                flat, at = np.asarray(flat, dtype=dtype), 0
                for k, a in group:   # shapes kept: a 0-d optim.step too
                    arrays[k] = flat[at:at + a.size].reshape(a.shape).copy()
                    at += a.size
            self._saved = {"step": int(step), "arrays": arrays}
            self.step = self._saved["step"]

        def reset(self):
            self.resets += 1
            before = trainer.rt.size
            rebuild(trainer, hvd)   # Horovod was initialised again: new rank, size, engine
            if trainer.rt.rank == 0:
                _log(f"elastic: resized from {before} to {trainer.rt.size} workers ({self.event}); "
                     f"continuing from the commit at step {self.step} (reset {self.resets})"
                     + (f"; the failed collective said: {self.cause}" if self.cause else ""))
            self.event, self.cause = None, ""

        def commit_due(self, done: int) -> None:
            self.step = done
            if done % trainer.cfg.train.elastic_commit_every == 0 or done == trainer.cfg.train.steps:
                self.commit()   # also raises HostsUpdatedInterrupt when hosts were added

    return hvd, NumpyState()


def run(trainer, loop):
    """trainer's loop under hvd.elastic.run: restarted from the last commit after each resize."""
    hvd, state = make_state(trainer)
    trainer.on_step = state.commit_due

    @_elastic_run(trainer.cfg.backend, hvd, trainer.cfg.train.elastic_join_timeout)
    def body(state):
        trainer.engine.load_state_dict(state._saved["arrays"])
        trainer.start_step = state.step
        if state.resets and trainer.is_root:   # the steps after the commit are logged again
            if getattr(trainer, "log", None) is not None:
                trainer.log.close()
            trainer.log = metrics.MetricsLog(trainer.out, state.step)
        return loop()
    return body(state)


# HOROVOD_GLOO_TIMEOUT_SECONDS, read by each hvd.init: both how long the rendezvous waits for
# every worker and how long a collective waits for a peer
GLOO_TIMEOUT = "HOROVOD_GLOO_TIMEOUT_SECONDS"


def _first_line(e: BaseException) -> str:
    """What a failed collective said, for the resize line."""
    return str(e).strip().split("\n")[0][:300]


def _elastic_run(backend: str, hvd, join_timeout: float):
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
        # The driver starts a joining worker only once the others have registered for the new
        # round, so they wait in init's rendezvous while it imports its framework and starts
        # Horovod; under a collective-sized timeout (a short one notices a lost worker quickly)
        # every worker aborts there: "Wait timeout after N seconds for key(s)". From the first
        # resize on, the rendezvous (and so a collective) waits train.elastic_join_timeout.
        os.environ[GLOO_TIMEOUT] = str(max(1, round(join_timeout)))
        hvd.init()

    def decorate(func):
        op_error = ()
        if backend == "tensorflow":
            import tensorflow as tf
            op_error = tf.errors.OpError

        def wrapper(state, *args, **kwargs):
            try:
                return func(state, *args, **kwargs)
            except HorovodInternalError as e:   # a lost peer, or any failed collective (a mismatch too)
                state.event, state.cause = "a worker was lost", _first_line(e)
                raise
            except HostsUpdatedInterrupt as e:
                state.event = "hosts were removed" if e.skip_sync else "hosts were added"
                raise
            except op_error as e:
                if "Horovod" not in str(e):
                    raise
                state.event, state.cause = "a worker was lost", _first_line(e)
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
    # train.elastic_global_batch: the same global batch, split over the new size (config.resolve)
    trainer.cfg = trainer.resolve(trainer.cfg)
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
            discovery: str | None = None, cooldown: tuple[int, int] | None = None) -> list[str]:
    """`hvdllm launch --elastic`: horovodrun's elastic Gloo mode, starting np_ workers, going on
    with no fewer than min_np and taking up to max_np. Without a discovery script, this machine's
    (discovery_script) on the loopback interface: Horovod's own interface detection needs two
    hosts to start an elastic job (horovod/runner/gloo_run.py _get_min_start_hosts). cooldown:
    horovodrun --blacklist-cooldown-range; without it a host whose worker failed stays out of the
    job even when the discovery script lists it again (horovod/runner/elastic/discovery.py)."""
    import tempfile
    min_np, max_np = min_np or np_, max_np or np_
    cmd = ["horovodrun", "-np", str(np_), "--gloo", "--min-np", str(min_np), "--max-np", str(max_np),
           # a resize that never settles (e.g. a collective that fails the same way after
           # every reset) ends the job after this many resets, instead of running forever
           "--reset-limit", str(RESET_LIMIT)]
    if cooldown:
        cmd += ["--blacklist-cooldown-range", *map(str, cooldown)]
    if discovery is None:
        path = Path(tempfile.mkdtemp(prefix="hvdllm-elastic-")) / "hosts.sh"
        cmd += ["--host-discovery-script", str(discovery_script(path, max_np)), "--network-interface", "lo"]
    else:
        cmd += ["--host-discovery-script", discovery]
    if args[:1] == ["train"] and "train.elastic=true" not in args:
        args = [*args, "--set", "train.elastic=true"]
    return cmd + [sys.executable, "-m", "hvdllm", *args]
