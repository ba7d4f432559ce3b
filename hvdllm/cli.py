"""`hvdllm` command line: train | launch | generate | predict | convert | bench | config."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from . import backends
from . import config as config_mod
from .errors import USER_ERRORS, ConfigError
from .runtime import env_rank


def env_world_size() -> int | None:
    """World size from the launcher's environment, known before any initialisation."""
    for key in ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def process_set_groups(cfg) -> list[tuple]:
    """Every rank registers the same Horovod process sets: the dp groups (when they are not the
    whole world) and the tp groups of the trainer grid."""
    from .layout import Layout
    lay = Layout.from_config(cfg, env_world_size(), 0)
    groups = lay.all_groups("dp") + (lay.all_groups("tp") if lay.tp > 1 else []) + [lay.role_ranks("trainer")]
    # Evaluators and generators build a model of their own on a one-rank set (strategies/roles.py).
    groups += [(r,) for role in ("evaluator", "generator") for r in lay.role_ranks(role)]
    # the whole world is Horovod's global set already; a duplicate set is refused by hvd.init
    return list(dict.fromkeys(g for g in groups if len(g) < lay.world_size))


def cmd_train(args) -> int:
    from . import runtime
    try:
        cfg = config_mod.load(args.config, args.set)
        source = None
        if cfg.train.init_from:   # its model settings and tokenizer (hvdllm/hf.py), read by every rank
            from . import hf
            source = hf.apply_init_from(cfg)
        cfg = config_mod.validate(cfg, env_world_size())
        if source is not None:
            cfg = hf.use_source_tokenizer(cfg, source)
    except ConfigError as e:  # every rank prints and leaves with 2, before anything is written
        print(f"[hvdllm] rank {env_rank()}: {e}", file=sys.stderr)
        return 2
    # caught from here on: a time-limit signal during start-up is honoured at the first check
    from . import stop
    stop.install(cfg.train.stop_signal, env_rank(), honoured=not cfg.ps.servers)
    loaded = []

    def start():   # the framework's import fails inside the guard too: every rank hears of it
        loaded.append(backends.load(cfg.backend))
        return runtime.start(loaded[0], cfg.aggregation, process_set_groups(cfg))
    rt, summary = runtime.run_guarded(start, lambda rt: _run_rank(cfg, rt, loaded[0]))
    if rt.rank == 0:
        _print_summary(cfg, summary)
    return stop.EXIT_STOPPED if summary and summary.get("stopped_at") else 0


def _run_rank(cfg, rt, backend) -> dict:
    """This rank's part: a trainer, or a role (parameter server, evaluator, generator)."""
    from .layout import Layout
    if Layout.from_config(cfg, rt.size, rt.rank).role() != "trainer":
        from .strategies.roles import run_role
        kinds = {}
        if cfg.task.kind == "classify":   # its evaluator and its data (hvdllm/finetune.py)
            from .finetune import ClassifyEvaluator, prepare_role
            kinds = {"evaluator": ClassifyEvaluator, "prepare": prepare_role}
        summary = run_role(cfg, rt, backend, **kinds)
    else:
        from .finetune import ClassifyTrainer
        from .trainer import Trainer
        summary = (ClassifyTrainer if cfg.task.kind == "classify" else Trainer)(cfg, rt, backend).run()
    if config_mod.extra_ranks(cfg):  # role ranks leave only once the trainers are done
        from .strategies.roles import final_barrier
        final_barrier(cfg, rt)
    return summary


def _print_summary(cfg, s: dict) -> None:
    if s.get("stopped_at"):
        print(f"\n[hvdllm] stopped by SIG{cfg.train.stop_signal} after step {s['stopped_at']} of "
              f"{cfg.train.steps}, checkpoint written: continue with --set train.resume=true (exit 75)")
        return
    print(f"\n[hvdllm] done: {cfg.train.steps} steps, backend={cfg.backend}, out_dir={cfg.train.out_dir}")
    if s.get("peak_rss_mib"):   # every trainer's, in trainer order (hvdllm plan predicts the largest)
        peaks = s["peak_rss_mib"]
        print(f"[hvdllm] peak resident memory in training: {max(peaks):.1f} MiB on the largest of "
              f"{len(peaks)} trainer rank(s), {min(peaks):.1f} MiB on the smallest")
    if "val_macro_f1" in s:   # task.kind = 'classify'
        print(f"[hvdllm] validation: accuracy {s['val_acc']:.3f}, macro-F1 {s['val_macro_f1']:.3f} on "
              f"{s['val_examples']} examples (val_loss {s['val_loss']:.4f}); majority-class baseline "
              f"({s['baseline_label']!r}): accuracy {s['baseline_acc']:.3f}, macro-F1 {s['baseline_macro_f1']:.3f}")
    elif "val_loss" in s:
        print(f"[hvdllm] val_loss {s['val_loss']:.4f} nats/token (ppl {s['val_ppl']:.2f}, "
              f"next-token acc {s['val_acc']:.3f}); unigram entropy of the corpus "
              f"{s['unigram_entropy']:.4f} nats/token")
    if "sample" in s:
        print("[hvdllm] sample:\n" + s["sample"])


def cmd_launch(args) -> int:
    from . import launch
    rest = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not rest:
        print("hvdllm launch: nothing to run; e.g. hvdllm launch -np 2 -- train configs/demo.toml",
              file=sys.stderr)
        return 2
    if args.launcher == "sbatch":
        return _submit(args, rest)
    if args.max_restarts < 0:
        print("hvdllm launch: --max-restarts must be >= 0", file=sys.stderr)
        return 2
    env = [launch.ATTEMPT_ENV] if args.max_restarts else ()   # mpirun forwards it to every rank

    def make(argv):
        if args.elastic:   # horovodrun's elastic Gloo mode (hvdllm/elastic.py)
            from . import elastic
            return elastic.command(args.np, argv, args.min_np, args.max_np, args.host_discovery_script,
                                   args.blacklist_cooldown_range)
        return launch.command(args.launcher, args.np, argv, args.hosts, env=env)
    if args.elastic and args.launcher not in ("mpirun", "horovodrun"):   # mpirun: the default
        print(f"hvdllm launch: --elastic runs under horovodrun --gloo, not --launcher {args.launcher}",
              file=sys.stderr)
        return 2
    launch.check_available(make(rest))
    return launch.run_with_restarts(make, rest, args.max_restarts)


def _submit(args, rest: list[str]) -> int:
    """Write the job script (printed), then sbatch it; --wait returns the job's exit code."""
    from pathlib import Path

    from . import launch
    text = launch.job_script(args.np, rest, args.nodes, args.time, args.partition,
                             signal_before=args.signal_before, requeue=args.requeue,
                             max_restarts=max(0, args.max_restarts))
    script = Path(args.script)
    script.write_text(text)
    cmd = ["sbatch", *(["--wait"] if args.wait else []), str(script)]
    launch.check_available(cmd)
    print(f"[hvdllm] job script {script}:\n{text}[hvdllm] running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def cmd_generate(args) -> int:
    from .generate import run
    return run(args)


def cmd_predict(args) -> int:
    from .predict import run
    return run(args)


def cmd_convert(args) -> int:
    from .convert import run
    return run(args)


def cmd_bench(args) -> int:
    mod = importlib.import_module(f"hvdllm.bench.{args.what}")
    return mod.main(args.rest)


def cmd_plan(args) -> int:
    from . import plan
    return plan.run(args)


def cmd_config(args) -> int:
    for key, default, help_ in config_mod.describe():
        print(f"{key:28s} {default!r:24s} {help_}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvdllm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (inside any launcher, or alone as one rank)")
    t.add_argument("config", nargs="?", help="TOML file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    t.set_defaults(fn=cmd_train)
    la = sub.add_parser("launch", help="start N ranks under mpirun, horovodrun or srun, or submit "
                                       "them as a Slurm batch job (sbatch)")
    la.add_argument("-np", type=int, required=True)
    la.add_argument("--launcher", default="mpirun", choices=["mpirun", "horovodrun", "srun", "sbatch"])
    la.add_argument("--hosts", help="host list passed to the launcher (-H)")
    la.add_argument("--script", default="hvdllm.sbatch", help="sbatch: where the job script is written")
    la.add_argument("--nodes", type=int, help="sbatch: #SBATCH --nodes")
    la.add_argument("--time", help="sbatch: #SBATCH --time, e.g. 01:00:00 (the job's deadline)")
    la.add_argument("--partition", help="sbatch: #SBATCH --partition")
    la.add_argument("--signal-before", type=int, default=120, metavar="SECONDS",
                    help="sbatch with --time: SIGUSR1 this long before the limit, so the trainers stop "
                         "with a checkpoint (train.stop_signal); 0 = no signal")
    la.add_argument("--wait", action="store_true", help="sbatch: wait for the job, exit with its code")
    la.add_argument("--requeue", action="store_true",
                    help="sbatch: when the trainers stop with a checkpoint before the time limit, requeue "
                         "the job; the run resumes from its latest checkpoint (train.resume=true)")
    la.add_argument("--max-restarts", type=int, default=0, metavar="K",
                    help="when the job ends because a rank died (killed, or failed with an error), run it "
                         "again from the latest checkpoint (train.resume=true), up to K times; with sbatch "
                         "the job script does so inside its allocation (default 0)")
    la.add_argument("--elastic", action="store_true",
                    help="Horovod elastic mode (horovodrun --gloo, train.elastic=true): a lost worker is "
                         "dropped and the rest continue from the last in-memory commit; data parallel only")
    la.add_argument("--min-np", type=int, help="--elastic: the fewest workers the job continues with "
                                               "(default -np)")
    la.add_argument("--max-np", type=int, help="--elastic: the most workers the job takes (default -np)")
    la.add_argument("--host-discovery-script", metavar="SCRIPT",
                    help="--elastic: prints the available hosts, one `host:slots` a line (default: this "
                         "machine's -np or --max-np slots)")
    la.add_argument("--blacklist-cooldown-range", type=int, nargs=2, metavar=("MIN_S", "MAX_S"),
                    help="--elastic: a host whose worker failed may take part again after this many seconds "
                         "(growing with each failure; default: never), so a worker that comes back rejoins")
    la.add_argument("command", nargs=argparse.REMAINDER)
    la.set_defaults(fn=cmd_launch)
    g = sub.add_parser("generate", help="sample from a trained run's latest checkpoint")
    g.add_argument("out_dir")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=list(backends.MODULES), help="load with the other framework")
    g.set_defaults(fn=cmd_generate)
    pr = sub.add_parser("predict", help="labels and probabilities for new texts from a classify run's latest "
                                         "checkpoint (task.kind = 'classify')")
    pr.add_argument("out_dir", metavar="RUN_DIR")
    pr.add_argument("--input", required=True, metavar="FILE",
                    help="texts: JSONL or CSV with the run's task.text_field, or plain text (one per line)")
    pr.add_argument("--output", metavar="FILE", help="write the JSONL predictions here (default: stdout)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--backend", choices=list(backends.MODULES), help="load with the other framework")
    pr.set_defaults(fn=cmd_predict)
    cv = sub.add_parser("convert", help="one unsharded .npz from a run/checkpoint, or Hugging Face "
                                        "folders in (--from-hf) and out (--to-hf)",
                        usage="hvdllm convert SRC OUT.npz [--hf] [--optimizer] | convert --from-hf DIR OUT "
                              "| convert SRC --to-hf DIR")
    cv.add_argument("paths", nargs="*", metavar="SRC/OUT",
                    help="SRC: a run's out_dir (its latest checkpoint) or a checkpoints/step_* folder; "
                         "OUT: the .npz to write, or with --from-hf the run folder to write")
    cv.add_argument("--hf", action="store_true", help="the .npz with Hugging Face key names (GPT-2 or Llama)")
    cv.add_argument("--from-hf", metavar="DIR", help="import a Hugging Face model folder (config.json, "
                    "model.safetensors or its index, tokenizer.json; GPT-2 or Llama) as the run folder OUT")
    cv.add_argument("--to-hf", metavar="DIR", help="export SRC as a Hugging Face folder (config.json, "
                    "model.safetensors, tokenizer.json) that transformers' from_pretrained loads")
    cv.add_argument("--backend", choices=list(backends.MODULES),
                    help="--from-hf: the backend the run's config.toml names (default torch)")
    cv.add_argument("--optimizer", action="store_true",
                    help="keep AdamW moments and step: a single-file checkpoint any layout resumes from")
    cv.add_argument("--merge-lora", action="store_true",
                    help="a LoRA run (finetune.lora_rank > 0): fold its adapters into its base "
                         "(train.init_from) and write the plain model (.npz or --to-hf)")
    cv.set_defaults(fn=cmd_convert)
    b = sub.add_parser("bench", help="benchmarks (not tests): dp, aggregation, pipeline, ps, tensor, hf, compute, "
                                     "memory, calibrate, plan")
    b.add_argument("what")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    pl = sub.add_parser("plan", help="rank the layouts (dp, pp, tp, ZeRO, micro-batches, checkpointing) "
                                     "for N nodes of G devices: memory, step time, the launch command")
    from .plan import add_arguments
    add_arguments(pl)
    pl.set_defaults(fn=cmd_plan)
    c = sub.add_parser("config", help="list every setting with its default and meaning")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"[hvdllm] error: {e}", file=sys.stderr)
        return e.exit_code
