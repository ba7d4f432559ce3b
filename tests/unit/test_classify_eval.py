"""Distributed evaluation of a classifier (hvdllm/classify_eval.py): the metrics' arithmetic by
hand, and 101 examples over 2 and 4 simulated ranks (simcoll: each rank scores its own share,
the counts are summed over the group) equal to one process exactly, every example counted once."""
import json

import numpy as np
import pytest
from simcoll import World

from hvdllm import classify_eval, labelled
from hvdllm.engine import EvalResult

NAMES = ["a", "b", "c"]


def test_scores_by_hand():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
    cm = classify_eval.confusion(labels, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    s = classify_eval.scores(cm, NAMES)
    assert s["accuracy"] == pytest.approx(6 / 10)
    # a: precision 2/3, recall 2/3; b: 1/3, 1/2; c: 3/4, 3/5
    f1 = [2 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)]
    for name, p, r, f, n in zip(NAMES, [2 / 3, 1 / 3, 3 / 4], [2 / 3, 1 / 2, 3 / 5], f1, [3, 2, 5]):
        assert s["per_class"][name] == pytest.approx({"precision": p, "recall": r, "f1": f, "support": n})
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)
    # a class that is neither a label nor a prediction is left out of the macro average (as
    # scikit-learn's); one never predicted has precision 0 (zero_division=0)
    s = classify_eval.scores(classify_eval.confusion([0, 0, 1], [0, 0, 0], 3), NAMES)
    assert s["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    assert classify_eval.majority_baseline([1, 1, 0], [0, 1, 1, 1], NAMES) == pytest.approx(
        {"baseline_label": "b", "baseline_acc": 0.75, "baseline_macro_f1": (0 + 2 * 0.75 / 1.75) / 2})


class FakeEngine:
    """Scores each example by its own tokens only (as a model does, whatever batch it is in) and
    sums the metrics over its simulated dp group."""

    def __init__(self, comm=None):
        self.comm, self.seen = comm, []

    def evaluate(self, x, y):
        self.seen += x[:, 0].tolist()
        z = np.sin(x[:, :3].astype(np.float64) * np.array([0.7, 1.3, 2.1]))   # (B, 3) logits
        loss = -(z[np.arange(len(y)), y[:, 0]] - np.log(np.exp(z).sum(1)))
        return EvalResult(float(loss.sum()), int((z.argmax(1) == y[:, 0]).sum()), len(y), logits=z.astype(np.float32))

    def allreduce_sum(self, v):
        return np.asarray(v, np.float64) if self.comm is None else self.comm.allreduce(np.asarray(v), op="sum")


def examples(n=101):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (n, 6))
    ids[:, 0] = np.arange(n)   # the first token names the example
    return labelled.Examples(ids, rng.integers(0, 3, n), rng.integers(1, 7, n))


@pytest.mark.parametrize("dp", [2, 4])
def test_distributed_evaluation_equals_one_process(dp, tmp_path):
    ex = examples()
    one = classify_eval.evaluate(FakeEngine(), ex, 8, 1, 0, NAMES)
    assert one["val_examples"] == 101 and sum(map(sum, one["val_confusion"])) == 101
    world = World(dp)
    comms = world.group()
    engines = [FakeEngine(comms[r]) for r in range(dp)]
    got = world.run(lambda r: classify_eval.evaluate(engines[r], ex, 8, dp, r, NAMES))
    seen = [e for eng in engines for e in eng.seen]
    assert sorted(seen) == list(range(101))                  # each example once, none dropped
    assert [len(eng.seen) for eng in engines] == [len(range(r, 101, dp)) for r in range(dp)]   # uneven
    for rec in got:                                          # every rank has the whole set's numbers
        for key in ("val_confusion", "val_acc", "val_macro_f1", "val_examples", "val_per_class"):
            assert rec[key] == one[key], key                 # exactly
        assert rec["val_loss"] == pytest.approx(one["val_loss"], rel=1e-12)
    json.dumps(got[0])                                       # a metrics.jsonl record
    png = classify_eval.plot_confusion(one["val_confusion"], NAMES, tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
