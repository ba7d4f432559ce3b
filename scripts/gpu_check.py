"""The one GPU check's driver (scripts/gpu_check.sh installs, then runs this): one table.

1. GPT-2 124M (12 x 768, T = 1024, vocab 50304), bf16, eager and compiled: hvdllm's own engine
   (its config and parallelize.build_engine) against a plain PyTorch loop written here (bf16
   autocast, SDPA, fused AdamW), same shape, batch and GPU: step time, tokens/s, MFU, ratio.
2. cuda vs cpu: hvdllm's losses for 3 steps of a small fp32 model on each.
3. TensorFlow: bf16 steps of the 124M shape on the GPU.
4. With >= 2 GPUs: `hvdllm train` at np=2 (dp), ZeRO-1 and pp=2 against np=1 (losses, norms).

Each part runs in its own process (`--part`): torch and TensorFlow never share one, and the
launcher of part 4 is not started from a process that has MPI initialised. A part prints one
`RESULT {json}` line. GPU_CHECK_DRY=1: a tiny model on the CPU, a few steps, so the whole path
runs on a machine without a GPU (everything but the device).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
# (n_layer, n_embd, n_head, block_size, vocab, batch): GPT-2 124M, or the dry run's toy
SHAPE = (2, 64, 2, 64, 512, 2) if DRY else (12, 768, 12, 1024, 50304, 16)
NAME = "tiny GPT (dry)" if DRY else "GPT-2 124M"
WARMUP, TIMED = (1, 3) if DRY else (3, 20)   # per row: a compiled row's first step compiles
DEVICE = "cpu" if DRY else "cuda"


def result(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def batches(V, B, T, n=4, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, size=(n, B, T + 1), dtype=np.int64)
    return [(np.ascontiguousarray(t[:, :-1]), np.ascontiguousarray(t[:, 1:])) for t in toks]


def timed(step, sync) -> float:
    """Seconds per step over TIMED steps after WARMUP; `sync` waits for the device."""
    for i in range(WARMUP):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(TIMED):
        step(WARMUP + i)
    sync()
    return (time.perf_counter() - t0) / TIMED


# -- part gpt2: hvdllm vs a plain PyTorch loop ------------------------------------------------------

def plain_gpt(L, C, H, T, V):
    """nanoGPT's GPT-2: pre-LN blocks, SDPA causal attention, tanh-GELU MLP, tied head."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T_, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T_, 3, H, C // H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T_, C))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.blocks:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))
    return GPT()


def plain_row(compiled: bool, dev, data) -> float:
    import torch
    L, C, H, T, V, B = SHAPE
    torch.manual_seed(0)
    model = plain_gpt(L, C, H, T, V).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")
    # the dry run traces through dynamo without inductor's C++ build (minutes on a small CPU)
    fwd = torch.compile(model, backend="aot_eager" if DRY else "inductor") if compiled else model
    xs = [(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)) for x, y in data]

    def step(i):
        x, y = xs[i % len(xs)]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, lambda: torch.cuda.synchronize() if dev.type == "cuda" else None)


def hvdllm_config(overrides):
    from hvdllm import config
    L, C, H, T, V, B = SHAPE
    sets = [f"model.n_layer={L}", f"model.n_embd={C}", f"model.n_head={H}", f"model.block_size={T}",
            f"model.vocab_size={V}", f"train.batch_size={B}", "train.threads=0", *overrides]
    cfg = config.load(ROOT / "configs" / "gpt2_124m.toml", sets)
    return config.resolve(config.validate(cfg, 1), 1, V)


def hvdllm_engine(cfg, rt, backend):
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    return build_engine(cfg, Layout.from_config(cfg, rt.size, rt.rank), rt, backend)


def hvdllm_row(cfg, rt, backend, data) -> float:
    engine = hvdllm_engine(cfg, rt, backend)
    last = []

    def step(i):
        x, y = data[i % len(data)]
        last.append(engine.train_step(x, y, 6e-4))
    # reading the last step's loss waits for the device (StepResult reads lazily)
    return timed(step, lambda: last and last[-1].loss)


def part_gpt2() -> None:
    import torch

    import torch_backend
    from hvdllm import device, params, runtime
    rt = runtime.start(torch_backend)
    dev = torch.device(device.select(DEVICE, rt, torch_backend))
    L, C, H, T, V, B = SHAPE
    data = batches(V, B, T)
    peak = torch_backend.matmul_flops("bf16")
    flops_tok = params.flops_per_token(hvdllm_config(["train.precision=bf16"]).model)
    rows = []
    for mode in ("eager", "compiled"):
        plain = plain_row(mode == "compiled", dev, data)
        extra = ["train.compile=true"] if mode == "compiled" else []
        ours = hvdllm_row(hvdllm_config(["train.precision=bf16", *extra]), rt, torch_backend, data)
        for who, s in (("plain torch", plain), ("hvdllm", ours)):
            rows.append({"row": f"{NAME} {mode}: {who}", "step_ms": None if s is None else 1e3 * s,
                         "tokens_per_s": None if s is None else B * T / s,
                         "mfu": None if s is None else flops_tok * B * T / s / peak,
                         "ratio": None if s is None else plain / s,   # speed: tokens/s over plain's
                         "note": ""})
    result({"rows": rows, "peak_tflops": peak / 1e12, "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"})


# -- part devices: the same 3 steps on the GPU and on the CPU ----------------------------------------

def part_devices() -> None:
    import torch_backend
    from hvdllm import runtime
    rt = runtime.start(torch_backend)
    small = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128",
             "model.vocab_size=512", "train.batch_size=4", "train.precision=fp32"]
    data = batches(512, 4, 128, n=3, seed=1)
    losses = {}
    for dev in (DEVICE, "cpu"):
        torch_backend.use_device("cuda:0" if dev == "cuda" else "cpu")
        engine = hvdllm_engine(hvdllm_config(small), rt, torch_backend)
        losses[dev] = [engine.train_step(x, y, 1e-3).loss for x, y in data]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[DEVICE], losses["cpu"]))
    result({"rows": [{"row": f"{DEVICE} vs cpu, 3 steps (fp32)", "note":
                      f"{DEVICE} {fmt_list(losses[DEVICE])} | cpu {fmt_list(losses['cpu'])} | "
                      f"max rel diff {worst:.1e} {'ok' if worst < 1e-4 else 'DIFFERENT'}"}],
            "ok": worst < 1e-4})


def fmt_list(xs) -> str:
    return "[" + ", ".join(f"{x:.5f}" for x in xs) + "]"


# -- part tf: TensorFlow bf16 steps on the GPU --------------------------------------------------------

def part_tf() -> None:
    import tensorflow as tf

    import tf_backend
    from hvdllm import device, params, runtime
    rt = runtime.start(tf_backend)
    dev = device.select(DEVICE, rt, tf_backend)
    L, C, H, T, V, B = SHAPE
    b = max(1, B // 4)   # TF's eager-built step holds more activations: a quarter of the batch
    cfg = hvdllm_config(["train.precision=bf16", f"train.batch_size={b}"])
    engine = hvdllm_engine(cfg, rt, tf_backend)
    data = batches(V, b, T)
    last = []

    def step(i):
        x, y = data[i % len(data)]
        last.append(engine.train_step(x, y, 6e-4))
    s = timed(step, lambda: last and last[-1].loss)
    placed = tf.random.normal([2, 2]).device   # where TF puts a fresh op: this rank's GPU
    peak = tf_backend.matmul_flops("bf16")
    tok = b * T
    result({"rows": [{"row": f"TensorFlow {NAME} bf16 (batch {b})", "step_ms": 1e3 * s, "tokens_per_s": tok / s,
                      "mfu": params.flops_per_token(cfg.model) * tok / s / peak,
                      "note": f"{dev}, ops on {placed.split('device:')[-1]}, loss {last[-1].loss:.4f}"}]})


# -- part 4: np=2, ZeRO-1 and pp=2 equal np=1 ----------------------------------------------------------

TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64", "data.max_bytes=400000",
        "train.steps=4", "train.eval_every=0", "train.sample_tokens=0", "train.progress=false",
        "train.plot=false", "train.checkpoint_every=0", "optim.warmup_steps=1", "optim.lr=3e-3"]


def train_run(tmp: Path, name: str, np_: int, sets) -> list[tuple[float, float]]:
    from hvdllm.bench.common import launch
    from hvdllm.launch import command
    out = tmp / name
    args = ["train"] + [a for kv in [*TINY, f"train.device={DEVICE}", f"train.out_dir={out}", *sets]
                        for a in ("--set", kv)]
    cmd = command("mpirun", np_, args, env=["PYTHONPATH", "HVDLLM_CACHE"]) if np_ > 1 else \
        [sys.executable, "-m", "hvdllm", *args]
    code, tail = launch(cmd, 300, "gpu_check", quiet=True)
    if code:
        raise RuntimeError(f"{name} exited {code}:\n{tail}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in recs if "loss" in r and "role" not in r]


def part_multi(gpus: int) -> list[dict]:
    if gpus < 2:
        return [{"row": "np=2, ZeRO-1, pp=2 vs np=1", "note": f"skipped: {gpus} GPU (needs 2)"}]
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ["HVDLLM_CACHE"] = str(tmp / "cache")
    ref = train_run(tmp, "np1", 1, ["train.batch_size=4"])
    rows = []
    for name, sets in (("np=2 (dp)", ["train.batch_size=2"]),
                       ("np=2 ZeRO-1", ["train.batch_size=2", "parallel.zero=1"]),
                       ("np=2 pp=2", ["train.batch_size=4", "parallel.pp=2", "parallel.microbatches=2"])):
        got = train_run(tmp, name.replace(" ", "_").replace("=", ""), 2, sets)
        worst = max(abs(a - b) / abs(b) for g, w in zip(got, ref) for a, b in zip(g, w))
        ok = len(got) == len(ref) and worst < 1e-4
        rows.append({"row": f"{name} vs np=1", "note": f"losses {fmt_list([g[0] for g in got])}, max rel "
                     f"diff (loss, grad norm) {worst:.1e} {'ok' if ok else 'DIFFERENT'}", "ok": ok})
    return rows


# -- the table ---------------------------------------------------------------------------------------

def run_part(part: str, timeout: float) -> dict:
    p = subprocess.run([sys.executable, __file__, "--part", part], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"})
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stdout + p.stderr)[-3000:]
    return {"rows": [{"row": f"part {part}", "note": f"FAILED (exit {p.returncode}); see below"}], "log": tail}


def gpu_count() -> int:
    if DRY:
        return 2   # the dry run exercises the >= 2 GPU part on the CPU
    p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU") for line in p.stdout.splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("gpt2", "devices", "tf"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "result.json"))
    args = ap.parse_args()
    if args.part:
        {"gpt2": part_gpt2, "devices": part_devices, "tf": part_tf}[args.part]()
        return 0
    from hvdllm.bench.common import print_table, write_json
    t0 = time.monotonic()
    parts = {name: run_part(name, limit) for name, limit in (("gpt2", 300), ("devices", 120), ("tf", 180))}
    try:
        multi = part_multi(gpu_count())
    except Exception as e:   # the table still prints, with the reason
        multi = [{"row": "np=2, ZeRO-1, pp=2 vs np=1", "note": f"FAILED: {e}"}]
    rows = [r for p in parts.values() for r in p["rows"]] + multi
    g = parts["gpt2"]
    print(f"\n[gpu_check] {g.get('gpu', '?')} ({g.get('device', '?')}), MFU against a measured bf16 matmul "
          f"of {g.get('peak_tflops', math.nan):.1f} TFLOP/s; {WARMUP} warm-up + {TIMED} timed steps per row"
          f"{' (DRY: tiny model on the CPU)' if DRY else ''}")
    print_table(rows, [("row", "check"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
                       ("ratio", "speed / plain"), ("note", "")])
    for name, p in parts.items():
        if "log" in p:
            print(f"\n[gpu_check] part {name}'s output (tail):\n{p['log']}")
    write_json(args.out, {"rows": rows, "dry": DRY, "seconds": time.monotonic() - t0})
    print(f"[gpu_check] {time.monotonic() - t0:.0f} s; written {args.out}")
    failed = any("FAILED" in str(r.get("note")) or r.get("ok") is False for r in rows) or \
        parts["devices"].get("ok") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
