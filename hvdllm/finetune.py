"""Fine-tuning for classification (task.kind = 'classify'): the trainer's loop, with labelled
examples instead of a token stream (hvdllm/labelled.py), the classifier's evaluation
(hvdllm/classify_eval.py) and train.init_from loading a pretrained backbone under a fresh head.

What stays the trainer's own: the step loop, learning-rate schedule, logging, checkpoints and
resume (a resume loads the head too), stop signals and the final barrier.
"""
from __future__ import annotations

import sys

from . import checkpoint, classify_eval, config, labelled, params, task
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
