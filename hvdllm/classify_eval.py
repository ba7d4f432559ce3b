"""Distributed evaluation of a classifier: each dp rank scores its own disjoint share of the
validation examples, the confusion matrix (and the loss) is summed over the dp group, and every
metric is computed from that matrix.

Shares: rank r of D takes examples r, r+D, r+2D, ... (the last ones uneven: shares differ by one
at most), scored in batches of train.batch_size; each rank runs as many batches as its share
needs (a classifier's evaluate is local to a rank under dp and ZeRO-1: no collective per batch).
Every example is counted once. The confusion matrix holds counts, summed in float64 (exact below
2**53), so accuracy, precision, recall, F1 and the matrix equal a single process's evaluation of
the same weights exactly (as long as each example gets the same argmax, which the arithmetic of
one example does not depend on the batch it shares); the loss agrees to float rounding.

Metrics (as scikit-learn's with zero_division=0): confusion[i, j] = examples of true label i
predicted j; per class precision = tp / predicted, recall = tp / support, F1 = their harmonic mean
(0 where undefined); macro-F1 = the mean F1 over the classes that occur as a label or a prediction.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def share(n: int, dp: int, rank: int) -> np.ndarray:
    """Indices of the examples dp rank `rank` of `dp` evaluates."""
    return np.arange(rank, n, dp)


def confusion(labels, preds, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) int64 counts, rows the true label, columns the prediction."""
    cm = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return cm


def scores(cm: np.ndarray, names: list[str]) -> dict:
    """accuracy, macro-F1 and per-class precision / recall / F1 / support from a confusion matrix."""
    cm = np.asarray(cm, np.int64)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    total = int(cm.sum())
    return {"accuracy": float(tp.sum() / total) if total else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": {n: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])} for i, n in enumerate(names)}}


def local_counts(engine, examples, batch_size: int, dp: int, rank: int, num_labels: int) -> np.ndarray:
    """This rank's share scored: [loss sum, examples, confusion matrix (row-major)] as float64,
    the vector the dp group sums."""
    idx = share(len(examples), dp, rank)
    cm = np.zeros((num_labels, num_labels), np.int64)
    loss = 0.0
    for lo in range(0, len(idx), batch_size):
        x, y = examples.batch(idx[lo:lo + batch_size])
        r = engine.evaluate(x, y)
        loss += r.loss_sum
        cm += confusion(y[:, 0], np.argmax(r.logits, axis=-1), num_labels)
    return np.concatenate([[loss, len(idx)], cm.reshape(-1)]).astype(np.float64)


def evaluate(engine, examples, batch_size: int, dp: int, rank: int, names: list[str]) -> dict:
    """The whole validation set's metrics on every rank of the dp group (collective: one
    allreduce of the counts): val_loss (the training loss's weighting), val_acc, val_macro_f1,
    val_examples, val_confusion (a list of rows) and val_per_class."""
    k = len(names)
    totals = engine.allreduce_sum(local_counts(engine, examples, batch_size, dp, rank, k))
    return record(totals, names)


def record(totals: np.ndarray, names: list[str]) -> dict:
    """The metrics record for summed counts [loss sum, examples, confusion matrix]."""
    k = len(names)
    cm = np.rint(totals[2:]).astype(np.int64).reshape(k, k)
    s = scores(cm, names)
    n = int(round(totals[1]))
    return {"val_loss": float(totals[0] / n), "val_acc": s["accuracy"], "val_macro_f1": s["macro_f1"],
            "val_examples": n, "val_confusion": cm.tolist(), "val_per_class": s["per_class"]}


def majority_baseline(train_labels, val_labels, names: list[str]) -> dict:
    """Accuracy and macro-F1 on the validation set of always predicting the training data's most
    frequent label: what a classifier must beat."""
    k = len(names)
    top = int(np.argmax(np.bincount(np.asarray(train_labels), minlength=k)))
    s = scores(confusion(val_labels, np.full(len(val_labels), top), k), names)
    return {"baseline_label": names[top], "baseline_acc": s["accuracy"], "baseline_macro_f1": s["macro_f1"]}


def plot_confusion(cm, names: list[str], path, title: str = "") -> Path:
    """A confusion-matrix PNG (rows the true label, columns the prediction, counts written in)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm)
    k = len(names)
    side = min(12.0, 2.5 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(side, side), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    if k <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if hi and cm[i, j] > hi / 2 else "black", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_labels(out_dir, names: list[str]) -> Path:
    """labels.json beside the run's config.toml: the label names in id order."""
    from .task import LABELS_FILE
    path = Path(out_dir) / LABELS_FILE
    path.write_text(json.dumps({"labels": list(names)}, indent=1) + "\n")
    return path
