"""The training loop, framework-neutral: which batch, which learning rate, when to evaluate, log
and checkpoint. The backend's Engine does the arithmetic and the collectives.

Per step every data-parallel rank takes its own disjoint slice of the global batch (see
data.Sampler), so np=k with micro-batch b computes exactly what one process with batch k*b does.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import (
    aggregation,
    checkpoint,
    config,
    data,
    device,
    elastic,
    hf,
    launch,
    lora,
    metrics,
    mfu,
    params,
    prefetch,
    stop,
    task,
)
from . import lr as lr_schedule
from .config import Config, to_toml
from .errors import CheckpointError, ConfigError, HvdllmError, InjectedFailure
from .layout import Layout
from .parallelize import build_engine
from .runtime import Runtime, Watchdog, cores
from .strategies import roles


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh, so the peak logged is the
    training's and not start-up's transients (the data build, the peak FLOP/s probe), which
    hvdllm plan's memory model leaves out."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:   # not Linux: the peak then counts start-up too
        pass


def peak_rss_mib() -> float:
    """This process's peak resident memory since reset_peak_rss (logged each step by rank 0;
    every trainer's at the end of the run)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, backend):
        self.cfg, self.rt, self.backend = cfg, rt, backend
        self.layout = Layout.from_config(cfg, rt.size, rt.rank)
        if cfg.aggregation.op == "adasum":
            rt.require_mpi("aggregation.op='adasum' (Horovod enables Adasum only on its MPI controller)")
        self.watchdog = Watchdog(rt)
        self.is_root = rt.rank == 0
        self.out = Path(cfg.train.out_dir)
        # train.device, before any tensor exists or a file is written (and before TensorFlow's
        # runtime starts: its visible GPUs are fixed then); every rank logs host, rank and device
        self.device = device.select(cfg.train.device, rt, backend)
        wire = aggregation.bf16_wire_problem(cfg.aggregation.compression, self.layout.dp, self.device)
        if wire:
            raise ConfigError(wire)
        backend.configure(cfg.train.threads or max(1, cores() // max(1, rt.local_size)), cfg.train.seed)
        with self.watchdog.deadline(cfg.train.step_timeout * 2, "preparing the corpus"):
            self.data = self.prepare_data(cfg)
        # derived settings filled in once, then frozen (rules that need the vocabulary run here)
        self.cfg = cfg = self.resolve(cfg)
        # every strategy is composed in one place (parallelize.py), parameter-server workers too
        self.engine = build_engine(cfg, self.layout, rt, backend)
        # the peak each trainer rank's MFU is measured against, measured by all of them at once
        self.peak_flops = backend.matmul_flops(cfg.train.precision)
        t = cfg.train
        self.sampler = self.make_sampler()
        self.hf_config_text = None
        # LoRA: the frozen base is train.init_from's at every start; a resume then loads the
        # adapters (and a classifier's head) and their optimizer state on it (hvdllm/lora.py)
        frozen_base = lora.enabled(cfg) and bool(t.init_from)
        if frozen_base:
            self._init_from(t.init_from)
        self.start_step = self._maybe_resume()
        if self.start_step == 0 and t.init_from and not frozen_base:
            self._init_from(t.init_from)
        if self.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(hf.for_toml(cfg)))
            self.log = metrics.MetricsLog(self.out, self.start_step if self.start_step else None,
                                          tensorboard=t.tensorboard)
        # Task separation (strategies/roles.py): rank 0 offers weight snapshots to role ranks.
        # Under pp / tp every trainer rank helps gather the weights (None where it has no part).
        self.publisher = roles.publisher(cfg, self.layout, rt, backend, self.watchdog,
                                         self.log.write if self.is_root else None)

    # what a task changes (hvdllm/finetune.py's ClassifyTrainer overrides these) -----------------
    samples = True   # a language model writes a sample at the end (train.sample_tokens)
    lora_base = None   # LoRA: the resolved train.init_from checkpoint or folder the base came from

    def prepare_data(self, cfg):
        return data.prepare(cfg.data, self.rt.rank, timeout_s=cfg.train.step_timeout * 2)

    def resolve(self, cfg) -> Config:
        return config.resolve(cfg, self.rt.size, self.data.tokenizer.vocab_size)

    def make_sampler(self):
        # k accumulated micro-batches of batch_size rows each: the sampler hands out k*batch_size.
        t = self.cfg.train
        return data.Sampler(self.data.train, self.cfg.model.block_size,
                            t.batch_size * self.cfg.aggregation.accumulation,
                            self.layout.dp, self.layout.dp_rank, t.seed)

    def data_summary(self) -> dict:
        return {"unigram_entropy": data.unigram_entropy(self.data.train)}

    def load_pretrained(self, weights, path) -> None:
        """train.init_from's weights into the engine (a mapping of whole arrays or slices)."""
        checkpoint.check_compatible(weights, self._model_shapes(), path)
        self.engine.load_state_dict(weights)

    def _maybe_resume(self) -> int:
        if not self.cfg.train.resume:
            return 0
        path = checkpoint.latest(self.out, log=self.is_root)   # the newest intact one
        if path is None:
            return 0
        state, meta = checkpoint.load(path)
        # the settings a resume must not change unnoticed (config.RESUME_CHECKED, train.resume_allow)
        changes = checkpoint.check_resume(path, meta, self.cfg,
                                          checkpoint.identity(self.cfg, self.layout, self.data))
        if self.is_root and changes:
            print("[hvdllm] resuming with changed settings (train.resume_allow):\n"
                  + "\n".join(f"  - {c}" for c in changes), file=sys.stderr)
        # LoRA: a checkpoint holds the trainable set only (the engine's param_shapes)
        checkpoint.check_compatible(state, self.engine.param_shapes if lora.enabled(self.cfg) else
                                    self._model_shapes(), path)
        if lora.enabled(self.cfg) and meta.get("lora_base", self.lora_base) != self.lora_base:
            raise CheckpointError(f"{path}: its LoRA adapters were trained on the base {meta['lora_base']}, but "
                                  f"train.init_from now reads {self.lora_base}; set train.init_from = "
                                  f"{meta['lora_base']}")
        self.engine.load_state_dict(state)
        if self.engine.scaler is not None and "loss_scale" in meta:
            self.engine.scaler.load(meta["loss_scale"])   # fp16: the scale the run had
        text = state.read_file(hf.HF_CONFIG_FILE) if hasattr(state, "read_file") else None
        self.hf_config_text = text.decode("utf-8") if text is not None else None
        if self.is_root:
            print(f"[hvdllm] resumed from {path} (step {meta['step']})", file=sys.stderr)
        return int(meta["step"])

    def _model_shapes(self) -> dict:
        """What a checkpoint must hold: the built-in model's shapes from its config (either family),
        a user's layer list's from its engine."""
        return self.engine.param_shapes if self.cfg.model.layers else params.param_shapes(task.model_config(self.cfg))

    def _init_from(self, source) -> None:
        """train.init_from: a Hugging Face model folder or an hvdllm run's weights, no optimizer
        state (hvdllm/hf.py). Each rank reads only the slices it holds, as a resume does."""
        src = hf.open_source(source)
        self.hf_config_text = src.hf_config_text()   # kept with every checkpoint, for --to-hf
        weights = src.weights() if self.cfg.model.layers else hf.fit_vocab_tables(src.weights(), self.cfg.model)
        self.load_pretrained(weights, src.path)
        if lora.enabled(self.cfg):   # the exact base, recorded with every checkpoint (convert --merge-lora)
            self.lora_base = str(Path(src.path).resolve())
        if self.is_root:
            print(f"[hvdllm] initialised from {src.path} ({'Hugging Face' if src.kind == 'hf' else 'hvdllm'} "
                  f"weights; optimizer fresh)", file=sys.stderr)

    # the loop --------------------------------------------------------------------------------
    on_step = None   # train.elastic: commits the state after each step (hvdllm/elastic.py)

    def run(self) -> dict:
        # train.elastic: the loop runs again from the last commit after each resize
        return elastic.run(self, self._loop) if self.cfg.train.elastic else self._loop()

    def _loop(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = self.layout.dp * t.batch_size * cfg.aggregation.accumulation * cfg.model.block_size
        flops_per_step = mfu.flops_per_step(cfg.model, tokens_per_step)
        trainers = self.layout.n_trainers
        if self.is_root:
            print(f"[hvdllm] MFU: {flops_per_step / tokens_per_step / 1e6:.1f} MFLOP per token against "
                  f"{self.peak_flops / 1e9:.1f} GFLOP/s per trainer rank x {trainers} (a {cfg.train.precision} "
                  f"matrix product measured on each rank's threads at start)", file=sys.stderr)
        bar = _progress(self.is_root and t.progress, t.steps, self.start_step)
        summary = {}
        # Async/SSP parameter-server workers share the servers' step budget (a fast worker runs
        # more steps than a slow one): their engine bounds the loop and ends it with res.final,
        # and evaluation during training is left to evaluator ranks (roles.evaluators).
        last = self.engine.max_steps or t.steps
        lockstep = self.engine.lockstep
        # on train.stop_signal the trainers agree on a step to stop at (stop.py); not with
        # parameter servers, whose step budget lives on the servers
        stopper = None
        if t.stop_signal != "none" and not cfg.ps.servers:
            coll = self.backend.Collectives(self.rt.process_set(self.layout.role_ranks("trainer")))
            stopper = stop.Agreement(self.backend.NumpyCollectives(coll), t.stop_check_s, self.start_step)
        window, window_steps = 0.0, 0   # seconds and steps since the last logged step
        # train.prefetch: the next batches made on a background thread (hvdllm/prefetch.py); the
        # backend may pin them (torch on CUDA) for a non-blocking copy to the device
        prepare = getattr(self.backend, "pin_batch", None)
        with prefetch.Prefetcher(self.sampler.batch, range(self.start_step, last), t.prefetch,
                                 t.step_timeout, prepare) as batches:
            reset_peak_rss()
            self.train_peak_mib = peak_rss_mib()
            for step in range(self.start_step, last):
                x, y = batches.get(step)
                lr = lr_schedule.lr_at(step, cfg.optim, t.steps)
                t0 = time.perf_counter()
                with self.watchdog.deadline(t.step_timeout, f"step {step}"):
                    if step == t.fail_at_step and self.rt.rank == t.fail_rank and (
                            elastic.should_fail(self, step) if t.elastic else launch.attempt() == 0):
                        if t.fail_mode == "kill":   # as a lost process: no message, no cleanup
                            os.kill(os.getpid(), signal.SIGKILL)
                        if t.fail_mode == "overflow":   # this rank's fp16 gradients overflow this step
                            self.engine.inject_overflow = True
                        else:
                            raise InjectedFailure(f"injected failure at step {step} (train.fail_at_step)")
                    res = self.engine.train_step(x, y, lr)
                    if (step + 1) % t.log_every == 0 or step + 1 == last:
                        res.loss   # read inside the timing: the device's queued work is done by now
                if self.publisher is not None:  # offer a snapshot to idle evaluators; never waits
                    self.publisher.after_step(step + 1, self.engine)
                dt = time.perf_counter() - t0
                if t.step_sleep_s:
                    time.sleep(t.step_sleep_s)
                # a step whose loss is not read may end before its device work does: the steps
                # between two logs are timed together, ending where the logged step's read waited
                window += dt
                window_steps += 1
                done = step + 1
                final = done == last or getattr(res, "final", False)
                stopping = not final and stopper is not None and stopper.due(done, dt)
                # the loss and gradient norm are read (a device sync on a GPU) only on logged steps
                if done % t.log_every == 0 or final or stopping:
                    self._log_step(res, step, lr, window / window_steps, tokens_per_step, flops_per_step, trainers, bar)
                    window, window_steps = 0.0, 0
                if bar:
                    bar.update(1)
                if (lockstep and t.eval_every and done % t.eval_every == 0) or final:
                    summary.update(self.evaluate(done))
                if (t.checkpoint_every and done % t.checkpoint_every == 0) or final or stopping:
                    self.save(done)
                if self.on_step is not None:
                    self.on_step(done)
                if stopping:
                    summary["stopped_at"] = done
                    break
                if final:
                    break
        if bar:
            bar.close()
        if self.start_step < last:
            summary["loss"] = res.loss
        summary = self.finish(summary)
        # No rank may leave while another still talks to it: Horovod shuts down for everyone
        # when the first process exits (e.g. a pipeline stage done before its peers).
        # The gather is that barrier too: each trainer's peak resident memory in training, as of
        # its last logged step (the final evaluation and checkpoint not counted)
        with self.watchdog.deadline(t.step_timeout, "the final barrier"):
            coll = self.backend.Collectives(self.rt.process_set(self.layout.role_ranks("trainer")))
            peaks = self.backend.NumpyCollectives(coll).allgather(np.array([self.train_peak_mib]),
                                                                   name="hvdllm.train_peaks")
        summary["peak_rss_mib"] = [float(v) for v in np.asarray(peaks).ravel()]
        return summary

    def _log_step(self, res, step, lr, dt, tokens_per_step, flops_per_step, trainers, bar) -> None:
        """Check and record one step's loss (every rank checks: each must stop on a bad loss);
        `dt`: seconds per step since the last logged one."""
        if not math.isfinite(res.loss):
            raise HvdllmError(f"loss became {res.loss} at step {step}; lower optim.lr "
                              f"or set optim.grad_clip")
        rec = {"step": step + 1, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
               "mfu": mfu.utilisation(flops_per_step, dt, self.peak_flops, trainers),
               "peak_rss_mib": peak_rss_mib()}
        self.train_peak_mib = rec["peak_rss_mib"]
        if self.engine.scaler is not None:   # train.precision = 'fp16'
            rec.update(loss_scale=self.engine.scaler.scale, skipped=res.skipped)
        if self.is_root:
            self.log.write(rec)
        if bar:
            bar.set_postfix(loss=f"{res.loss:.3f}", mfu=f"{rec['mfu']:.1%}", refresh=False)

    def evaluate(self, step: int) -> dict:
        t, m = self.cfg.train, self.cfg.model
        totals = np.zeros(3)
        with self.watchdog.deadline(t.step_timeout, f"evaluation at step {step}"):
            for x, y in data.eval_batches(self.data.val, m.block_size, t.batch_size, self.layout.dp,
                                          self.layout.dp_rank, t.eval_batches):
                r = self.engine.evaluate(x, y)
                totals += (r.loss_sum, r.correct, r.tokens)
            loss_sum, correct, tokens = self.engine.allreduce_sum(totals)
        rec = {"step": step, "val_loss": loss_sum / tokens, "val_ppl": math.exp(loss_sum / tokens),
               "val_acc": correct / tokens}
        if self.is_root:
            self.log.write(rec)
        return rec

    def save(self, step: int) -> None:
        """A sharded checkpoint (checkpoint.py): the dp-rank-0 process of each (pipeline stage,
        tp rank) writes its slice (under ZeRO-1 every dp rank also writes the optimizer range it
        holds), and after a barrier rank 0 writes the manifest and publishes the folder."""
        lay = self.layout
        dp_files = lay.dp if self.cfg.parallel.zero else 1
        names = [checkpoint.shard_name(p, t, d) for p in range(lay.pp) for t in range(lay.tp)
                 for d in range(dp_files)]
        with self.watchdog.deadline(self.cfg.train.step_timeout, f"checkpoint at step {step}"):
            local, placements = self.engine.shard_state()
            if lay.dp_rank < dp_files:
                checkpoint.write_shard(self.out, step, checkpoint.shard_name(lay.pp_rank, lay.tp_rank, lay.dp_rank),
                                       local, placements)
            if len(names) > 1:   # every shard on disk before rank 0 publishes the folder
                self.backend.Collectives(self.rt.process_set(lay.role_ranks("trainer"))).barrier()
            if self.is_root:
                meta = {"config": self.cfg.to_dict(), "layout": lay.describe(),
                        "backend": self.cfg.backend, "tokenizer": self.data.tokenizer.name,
                        # global batch, tokens' digest, the tokenizer (a file): what resume checks
                        **checkpoint.identity(self.cfg, lay, self.data)}
                if self.lora_base is not None:
                    meta["lora_base"] = self.lora_base
                if self.engine.scaler is not None:   # fp16's loss scale
                    meta["loss_scale"] = self.engine.scaler.state()
                if self.hf_config_text is not None:   # the imported model's config.json (hf.py)
                    meta[checkpoint.EXTRA_FILES][hf.HF_CONFIG_FILE] = self.hf_config_text
                checkpoint.finalize(self.out, step, names, meta, self.cfg.train.keep_checkpoints)

    def finish(self, summary: dict) -> dict:
        t = self.cfg.train
        summary.update(self.data_summary())
        # every rank: under tp sampling is collective
        if self.samples and t.sample_tokens and not summary.get("stopped_at"):
            tok = self.data.tokenizer
            ids = self.engine.generate(tok.encode(t.sample_prompt), t.sample_tokens, 0.8, 40, t.seed)
            if self.is_root:
                text = t.sample_prompt + tok.decode(ids)
                (self.out / "sample.txt").write_text(text)
                summary["sample"] = text
        if self.publisher is not None:  # the final weights to each role, its last record, SHUTDOWN
            with self.watchdog.deadline(3 * t.step_timeout, "the role ranks' last snapshot"):
                self.publisher.close(self.engine)
        self.engine.close()  # parameter servers: SHUTDOWN from trainer rank 0
        if self.is_root:
            self.log.close()
            if t.plot:
                metrics.plot(self.out, f"{self.cfg.backend} · {self.layout.describe()}")
        return summary

