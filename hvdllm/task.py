"""What the model is trained to do (`task.kind`): 'lm' (next-token prediction, the default) or
'classify' (a label per text), framework-neutral. The backends' twins (torch_backend/classify.py,
tf_backend/classify.py) compute exactly what is written here.

classify, on the built-in GPT:
  hidden  h = ln_f(blocks(embeddings(x)))            (B, T, C): layers 0..L, then the final norm
  pooled  task.pooling = 'last': h[b, length_b - 1]  (the last real token of each sequence)
                         'mean': mean of h[b, :length_b]
  logits  pooled @ cls.weight + cls.bias             (B, num_labels)
  loss    mean over the batch's B examples of w[label_b] * cross-entropy(logits_b, label_b), with
          w = task.class_weights (all 1 when empty).
The loss is a plain mean over examples (not normalised by the weights' sum, as torch's
`cross_entropy(weight=...)` is): a mean of equal-sized shards is then the mean of the whole
batch, so np=k trains exactly as np=1 and accumulation as one big batch.

Batches: x (B, T) int64 token ids, right-padded with 0 to model.block_size; y (B, 2) int64, the
columns [label, length], length >= 1 the number of real tokens. The model is causal, so padding
after a sequence never changes its real tokens' hidden states: pooling needs only the length,
no attention mask.

Parameters: the backbone's (hvdllm.params, the LM's names) and the head `cls.weight`
(n_embd, num_labels), `cls.bias` (num_labels,), drawn after every other parameter (N(0, 0.02)
and zeros), so the backbone's initial values are the language model's. A classifier has no
language-model output: an untied `lm_head` is not part of it (not loaded, trained or saved); a
tied `wte` is the token embedding and trains as such.

Layouts: data parallelism, ZeRO-1/2/3 (also inside pipeline stages), accumulation, tensor and
pipeline parallelism, and evaluator ranks (roles.evaluators: hvdllm/finetune.py's
ClassifyEvaluator). Under tp the head is replicated (strategies/tensor_parallel.py replicates
every name it does not split): it reads the whole hidden state the row-parallel layers have
summed, so every tp rank computes the same logits and the same gradient of that state, as the
residual stream's gradient is anyway. Under pp the head is layer L+1
(hvdllm/params.layer_params), on the last stage: the pipeline hands the last stage each micro-
batch's y as its target, as it hands an LM its next tokens, and the backend's Classifier runs
the final norm, pooling and cls.* there on the hidden state it received
(engines.PipelineStageBase.body: the layers the model runs itself). The last stage's evaluation
broadcasts the logits with the loss, so every stage counts the same predictions."""
from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np

from .params import CLASSIFIER_HEAD as HEAD
from .params import param_shapes

KINDS = ("lm", "classify")
POOLINGS = ("last", "mean")
LABELS_FILE = "labels.json"   # the label names in id order, beside a run's config.toml


def is_classify(cfg) -> bool:
    return getattr(getattr(cfg, "task", None), "kind", "lm") == "classify"


class ClassifierModel:
    """model.* plus the head's size: what hvdllm.params lays out and both backends build for a
    classifier (any model.* attribute reads through to the run's ModelConfig)."""

    def __init__(self, model_cfg, num_labels: int):
        self._model, self.num_labels = model_cfg, num_labels

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __repr__(self):
        return f"ClassifierModel({self._model!r}, num_labels={self.num_labels})"


def model_config(cfg):
    """The model the engines build for this run: cfg.model, or with task.kind = 'classify' the
    classifier (its head sized by the resolved task.num_labels)."""
    if not is_classify(cfg):
        return cfg.model
    return ClassifierModel(cfg.model, cfg.task.num_labels)


def backbone_shapes(cfg) -> dict:
    """The classifier's parameters but its head: what train.init_from must supply."""
    return {n: s for n, s in param_shapes(model_config(cfg)).items() if n not in HEAD}


def class_weights(task_cfg) -> np.ndarray | None:
    """task.class_weights as float32 (None: every class weighs 1)."""
    w = list(getattr(task_cfg, "class_weights", []) or [])
    return np.asarray(w, np.float32) if w else None


class ClassifierBase:
    """What both backends' Classifier (torch_backend/classify.py, tf_backend/classify.py) hold:
    the model (built from `model_config`), task.pooling, and task.class_weights as the backend's
    tensor (`tensor(ndarray)`, made once, not per step; None: every class weighs 1)."""

    def __init__(self, model, task_cfg, tensor):
        self.model, self.pooling, self.L = model, task_cfg.pooling, model.cfg.n_layer
        w = class_weights(task_cfg)
        self.weights = None if w is None else tensor(w)


def problems(cfg) -> list[str]:
    """task.* rules (config.validate): what classification needs and what it does not combine
    with yet. Files are checked for existence here; their contents when they are read
    (hvdllm/labelled.py)."""
    from pathlib import Path
    t, p = cfg.task, []
    if t.kind not in KINDS:
        return [f"task.kind: {t.kind!r} is not one of {', '.join(map(repr, KINDS))}"]
    if t.kind == "lm":
        set_keys = [k for k in ("train_file", "validation_file") if getattr(t, k)]
        if set_keys or t.num_labels or t.class_weights or t.labels:
            p.append("task.train_file / validation_file / num_labels / class_weights / labels: only "
                     "task.kind = 'classify' reads them; set task.kind = 'classify' or remove them")
        return p
    if t.pooling not in POOLINGS:
        p.append(f"task.pooling: {t.pooling!r} is not one of {', '.join(map(repr, POOLINGS))}")
    if not t.train_file:
        p.append("task.train_file: task.kind = 'classify' needs the labelled training data (JSONL, CSV, "
                 "Parquet or a saved Hugging Face dataset folder)")
    for key in ("train_file", "validation_file"):
        path = getattr(t, key)
        if path and not Path(path).expanduser().exists():
            p.append(f"task.{key}: {path} does not exist")
    if not t.text_field or not t.label_field:
        p.append("task.text_field / task.label_field: must name the fields that hold the text and the label")
    if t.num_labels < 0 or t.num_labels == 1:
        p.append(f"task.num_labels: must be 0 (the labels found in task.train_file) or >= 2, got {t.num_labels}")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0 for w in t.class_weights):
        p.append(f"task.class_weights: must be numbers >= 0 (one per label, in label id order), got "
                 f"{t.class_weights}")
    if t.labels and len(set(map(str, t.labels))) != len(t.labels):
        p.append(f"task.labels: names must be distinct, got {t.labels}")
    if cfg.ps.servers:
        p.append("ps.servers: not combinable with task.kind = 'classify' yet; set ps.servers = 0 (data "
                 "parallelism, ZeRO, parallel.tp / parallel.pp and roles.evaluators work)")
    if cfg.roles.generators:
        p.append("roles.generators: a classifier has no language-model output to sample from; set "
                 "roles.generators = 0 (roles.evaluators evaluate its snapshots)")
    if cfg.model.layers:
        p.append("model.layers: task.kind = 'classify' puts its head on the built-in GPT only; set "
                 "model.layers = [] (model.family = 'gpt2' or 'llama')")
    if cfg.data.tokenizer == "bpe":
        p.append("data.tokenizer: task.kind = 'classify' tokenises with the byte tokenizer or with the "
                 "tokenizer of train.init_from's model; remove data.tokenizer = 'bpe' (or fine-tune a "
                 "run that trained one: train.init_from = that run)")
    return p


def resolve(cfg, label_names: list[str]):
    """task.num_labels (0 = the labels found) and task.labels (the names in id order) filled in
    from the training data, so the run's config.toml and every checkpoint say what each id means.
    ConfigError when task.num_labels or task.class_weights disagree with the labels."""
    import dataclasses

    from .errors import ConfigError
    t = cfg.task
    n = t.num_labels or len(label_names)
    p = []
    if n < len(label_names):
        p.append(f"task.num_labels: {t.num_labels} but task.train_file has {len(label_names)} labels "
                 f"({', '.join(label_names[:8])}{' ...' if len(label_names) > 8 else ''}); set "
                 f"task.num_labels = 0 (the labels found) or >= {len(label_names)}")
    if n < 2:
        p.append(f"task.train_file: only {len(label_names)} distinct label ({', '.join(label_names)}); a "
                 f"classifier needs at least 2 (or set task.num_labels)")
    if t.class_weights and len(t.class_weights) != n:
        p.append(f"task.class_weights: {len(t.class_weights)} weights for {n} labels; give one per "
                 f"label, in id order ({', '.join(label_names[:8])})")
    if p:
        raise ConfigError(p)
    names = list(label_names) + [str(i) for i in range(len(label_names), n)]
    return dataclasses.replace(cfg, task=dataclasses.replace(t, num_labels=n, labels=names))


class FreshHead(Mapping):
    """A pretrained model's weights (a checkpoint, or a Hugging Face folder's HFWeights) with the
    classifier's head (or LoRA's adapters, hvdllm/engines.py) added from their seeded initial
    values: the engines load it as any state (`slice` and `shapes` pass through, so each rank
    still reads only what it holds)."""

    def __init__(self, weights, head: dict):
        self.weights, self.head = weights, head

    @cached_property
    def shapes(self) -> dict:
        """{name: whole shape}, as a sharded checkpoint has them (a tp rank cuts its slices by them)."""
        inner = getattr(self.weights, "shapes", None)
        inner = dict(inner) if inner is not None else {k: np.shape(self.weights[k]) for k in self.weights}
        return {**inner, **{k: np.shape(v) for k, v in self.head.items()}}

    def __getitem__(self, name):
        return self.head[name] if name in self.head else self.weights[name]

    def slice(self, name, pl):
        if name not in self.head and hasattr(self.weights, "slice"):
            return self.weights.slice(name, pl)   # only the slice is read from its file
        from . import placement
        return placement.take(np.asarray(self[name]), pl)

    def __iter__(self):
        yield from (k for k in self.weights if k not in self.head)
        yield from self.head

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, name):
        return name in self.head or name in self.weights
