"""metrics.jsonl (one JSON object per record) and the loss plot, written by rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """metrics.jsonl, and with `tensorboard` the same records as TensorBoard scalars (events.py)."""

    def __init__(self, out_dir, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.events = None
        if tensorboard:
            from .events import EventWriter
            self.events = EventWriter(Path(out_dir) / "tensorboard")
        if resume_step is None:
            self.path.write_text("")
        else:
            # A resumed run rewrites the steps the interrupted run logged after its checkpoint.
            kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.events is not None:
            self.events.write(record)

    def close(self):
        self._f.close()
        if self.events is not None:
            self.events.close()


def read(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot(out_dir, title: str = "") -> Path | None:
    """loss.png: training loss and validation loss against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read(Path(out_dir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
