"""Fine-tuning for classification (task.kind = 'classify'): the trainer's loop, with labelled
examples instead of a token stream (hvdllm/labelled.py), the classifier's evaluation
(hvdllm/classify_eval.py) and train.init_from loading a pretrained backbone under a fresh head.

What stays the trainer's own: the step loop, learning-rate schedule, logging, checkpoints and
resume (a resume loads the head too), stop signals and the final barrier.

Evaluator ranks (roles.evaluators, strategies/roles.py) of a classify run are ClassifyEvaluators:
each scores the snapshot it receives on the trainers' own shares and batches (every dp rank's
share in turn, classify_eval.local_counts) and sums the counts, so its record (accuracy,
macro-F1, per-class P/R/F1, the confusion matrix) equals the trainers' evaluation of the same
weights exactly; rank 0 writes it to metrics.jsonl, and the evaluator draws
confusion_evaluator<rank>.png in train.out_dir (train.plot).
"""
from __future__ import annotations

import sys

from . import checkpoint, classify_eval, config, labelled, params, task
from .strategies.roles import Evaluator
from .task import FreshHead
from .trainer import Trainer


class ClassifyTrainer(Trainer):
    samples = False   # a classifier has no language-model output to sample from

    def prepare_data(self, cfg):
        return labelled.prepare(cfg, self.rt.rank)

    def resolve(self, cfg):
        """task.num_labels / task.labels from the training data, then the trainer's settings."""
        return config.resolve(task.resolve(cfg, self.data.labels), self.rt.size, self.data.tokenizer.vocab_size)

    def make_sampler(self):
        t = self.cfg.train
        return labelled.ExampleSampler(self.data.train, t.batch_size * self.cfg.aggregation.accumulation,
                                       self.layout.dp, self.layout.dp_rank, t.seed)

    def __init__(self, cfg, rt, backend):
        super().__init__(cfg, rt, backend)
        if self.is_root:   # the out_dir exists now (the base class made it)
            classify_eval.write_labels(self.out, self.cfg.task.labels)

    def load_pretrained(self, weights, path) -> None:
        """train.init_from: the pretrained backbone (an LM run, a classify run or a Hugging Face
        folder) under a fresh head, the classifier's seeded initial values whatever the source
        held (its labels may mean something else)."""
        checkpoint.check_compatible(weights, task.backbone_shapes(self.cfg), path)
        head = params.init_params(task.model_config(self.cfg), self.cfg.train.seed, names=task.HEAD)
        self.engine.load_state_dict(FreshHead(weights, head))
        if self.is_root:
            print(f"[hvdllm] classifier head ({self.cfg.task.num_labels} labels) fresh on the "
                  f"pretrained backbone", file=sys.stderr)

    def evaluate(self, step: int) -> dict:
        t = self.cfg.train
        with self.watchdog.deadline(t.step_timeout, f"evaluation at step {step}"):
            rec = classify_eval.evaluate(self.engine, self.data.val, t.batch_size, self.layout.dp,
                                         self.layout.dp_rank, self.cfg.task.labels)
        rec = {"step": step, **rec}
        if self.is_root:
            self.log.write(rec)
            if t.plot:
                classify_eval.plot_confusion(rec["val_confusion"], self.cfg.task.labels, self.out / "confusion.png",
                                             f"step {step}: accuracy {rec['val_acc']:.3f}, macro-F1 "
                                             f"{rec['val_macro_f1']:.3f}")
        return rec

    def data_summary(self) -> dict:
        return classify_eval.majority_baseline(self.data.train.labels, self.data.val.labels, self.cfg.task.labels)


def prepare_role(cfg, rt):
    """A classify run's role rank: the labelled examples and the config resolved from them, as the
    trainers resolve theirs (task.num_labels, task.labels: the snapshot's head and the names)."""
    examples = labelled.prepare(cfg, rt.rank)
    cfg = config.resolve(task.resolve(cfg, examples.labels), rt.size, examples.tokenizer.vocab_size)
    return examples, cfg


class ClassifyEvaluator(Evaluator):
    """An evaluator rank of a classify run (the loop is roles.SnapshotWorker's)."""

    def work(self, step: int) -> dict:
        t, names, dp = self.cfg.train, self.cfg.task.labels, self.layout.dp
        # each dp rank's share in its batches, summed in rank order: what the trainers' allreduce sums
        totals = sum(classify_eval.local_counts(self.engine, self.data.val, t.batch_size, dp, r, len(names))
                     for r in range(dp))
        rec = classify_eval.record(totals, names)
        if t.plot:   # the trainers draw confusion.png; each evaluator its own
            out = self.cfg.train.out_dir
            classify_eval.plot_confusion(rec["val_confusion"], names,
                                         f"{out}/confusion_evaluator{self.layout.rank}.png",
                                         f"evaluator rank {self.layout.rank}, step {step}: accuracy "
                                         f"{rec['val_acc']:.3f}, macro-F1 {rec['val_macro_f1']:.3f}")
        return rec
