"""`hvdllm bench hf`: importing Hugging Face models (time and memory per rank), and the step time
of a llama against a gpt2 of equal parameter count.

    hvdllm bench hf [--models gpt2-124m,llama-0.5b] [--np 1,4] [--backends torch[,tensorflow]]
                    [--width 256] [--layers 4] [--steps 10] [--out runs/bench/hf.json]

1. For each model, `transformers` builds it with random weights and `save_pretrained`s it (fp32
   safetensors, in a temporary folder). Then, for each backend and each N in --np,
       mpirun -np N ... python -m hvdllm.bench.hf_worker import --folder DIR --backend B
   builds the engine `hvdllm train --set train.init_from=DIR --set parallel.tp=N` builds and reads
   the weights the way init_from does: each rank only its tensor-parallel slices. Per rank: read
   seconds, parameter bytes held, resident memory after building the engine and at its peak.
   Goal: peak memory per rank falls with N (each rank holds 1/N of the matrices).
2. `mpirun -np 1 ... hf_worker step`: gpt2 and llama of --layers x --width with the llama's
   SwiGLU width chosen for equal parameters, timed interleaved on the same random batches.

A benchmark, not a test: nothing fails on a slow result.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from pathlib import Path

from hvdllm.bench import common

TAG = "[bench hf]"
MODELS = {   # name: (family, transformers config keys)
    # GPT-2 124M with its 50257 ids (29 x 1733: no tp divides them), imported padded to 50304 rows
    # (model.vocab_multiple = 128, hf_worker.import_config)
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "llama-0.5b": ("llama", dict(num_hidden_layers=36, hidden_size=1024, intermediate_size=2816,
                                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                 max_position_embeddings=2048, tie_word_embeddings=False)),
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=509)),   # padded: 512
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
                                 tie_word_embeddings=False)),
}


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm bench hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2-124m,llama-0.5b", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--np", default="1,4", help="comma list of rank counts (tp = ranks)")
    p.add_argument("--backends", default="torch")
    p.add_argument("--width", type=int, default=256, help="step section: the models' width")
    p.add_argument("--layers", type=int, default=4, help="step section: the models' depth")
    p.add_argument("--no-step", action="store_true", help="skip the step-time section")
    common.add_timing_options(p, steps=10, warmup=2)
    common.add_output_options(p, "hf", plot=False)
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad:
        p.error(f"--models: {bad} not among {', '.join(MODELS)}")
    args.nps = [int(n) for n in args.np.split(",") if n.strip()]
    args.backend_names = common.backend_list(p, args.backends)
    return args


def save_random_model(name: str, folder: Path) -> float:
    """The model of MODELS[name], random, saved by transformers with a byte-level BPE tokenizer
    (trained on hvdllm's own sources, at most 512 ids): seconds it took."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    family, keys = MODELS[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = (transformers.GPT2Config if family == "gpt2" else transformers.LlamaConfig)(**keys)
    model = (transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM)(cfg)
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(512, keys["vocab_size"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(Path(__file__).parents[1].glob("*.py"))], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return time.perf_counter() - t0


def worker(what: str, np_: int, backend: str, out: Path, *extra) -> list[str]:
    return common.worker_command("hvdllm.bench.hf_worker", np_, [what, "--backend", backend, "--out", out, *extra])


def import_rows(run: dict, model: str) -> list[dict]:
    ranks = run["ranks"]
    return [{"model": model, "backend": run["backend"], "np": run["np"], "params": run["params"],
             "read_s": max(r["read_s"] for r in ranks),
             "param_mib": max(r["param_bytes"] for r in ranks) / 2 ** 20,
             "built_mib": max(r["rss_built_mib"] for r in ranks),
             "peak_mib": max(r["peak_rss_mib"] for r in ranks),
             "anon_read_mib": max(r["anon_peak_read_mib"] for r in ranks),
             "start_mib": max(r["rss_start_mib"] for r in ranks)}]


def main(argv=None) -> int:
    args = parse(list(argv or []))
    result = {"benchmark": "hf", "argv": ["hvdllm", "bench", "hf", *(argv or [])], "import": [], "step": [],
              "commands": [], "failed": []}
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-hf-") as tmp:
        tmp = Path(tmp)
        for name in args.model_list:
            folder = tmp / name
            common.say(TAG, f"{name}: building it with transformers and saving it to {folder}")
            secs = save_random_model(name, folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20
            common.say(TAG, f"{name}: saved in {secs:.1f} s ({size:.0f} MiB of safetensors)")
            for backend in args.backend_names:
                for n in args.nps:
                    cmd = worker("import", n, backend, tmp / "part.json", "--folder", folder)
                    result["commands"].append(shlex.join(cmd))
                    run, rc, wall = common.run_worker(cmd, tmp / "part.json", args.timeout, TAG,
                                                      f"{name} {backend} np={n}")
                    if run is None:
                        result["failed"].append(shlex.join(cmd))
                        continue
                    result["import"] += import_rows(run, name)
        if not args.no_step:
            for backend in args.backend_names:
                cmd = worker("step", 1, backend, tmp / "part.json", "--width", args.width, "--layers", args.layers,
                             "--steps", args.steps, "--warmup", args.warmup, "--per-round", args.per_round)
                result["commands"].append(shlex.join(cmd))
                run, rc, wall = common.run_worker(cmd, tmp / "part.json", args.timeout, TAG, f"step time {backend}")
                if run is None:
                    result["failed"].append(shlex.join(cmd))
                    continue
                gpt = next(r for r in run["rows"] if r["family"] == "gpt2")
                for r in run["rows"]:
                    result["step"].append({"backend": backend, **r, "vs_gpt2": r["median_s"] / gpt["median_s"]})
    if result["import"]:
        print(f"\n{TAG} import of a Hugging Face folder at tp = np (the slowest / largest rank; 1 thread/rank)")
        common.print_table(result["import"], [("model", "model"), ("backend", "backend"), ("np", "np"),
                                              ("params", "params"), ("read_s", "read s"),
                                              ("param_mib", "params MiB/rank"), ("built_mib", "RSS built MiB"),
                                              ("anon_read_mib", "peak anon MiB during read"),
                                              ("peak_mib", "peak RSS MiB"), ("start_mib", "RSS at start MiB")])
    if result["step"]:
        print(f"\n{TAG} training step, {args.layers} layers x {args.width}, np=1, the llama's SwiGLU width "
              f"chosen for equal parameters")
        common.print_table(result["step"], [("backend", "backend"), ("family", "family"), ("params", "params"),
                                            ("ffn_hidden", "ffn"), ("median_s", "median step s"),
                                            ("p25_s", "p25"), ("p75_s", "p75"), ("vs_gpt2", "vs gpt2")])
    path = common.write_json(args.out, result)
    print(f"\n{TAG} wrote {path}")
    return 1 if result["failed"] else 0
