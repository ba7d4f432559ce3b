"""task.kind = 'classify' on the torch GPT: pooling, the head and the loss, as hvdllm/task.py
writes them (tf_backend/classify.py is the twin)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hvdllm import task
from hvdllm.engine import EvalResult

from .collectives import to_host


class Classifier(task.ClassifierBase):
    """The head on `model` (a GPT built from hvdllm.task.model_config: it holds cls.weight and
    cls.bias). Batches as hvdllm/engine.py says: x (B, T) ids, y (B, 2) = [label, length]."""

    def __init__(self, model, task_cfg):
        super().__init__(model, task_cfg, torch.from_numpy)

    def logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.model.run_layers(range(self.L + 1), x), y)

    def head_logits(self, hidden: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The head's layer (L + 1) on the blocks' output: final norm, pooling, cls (ZeRO-2/3's
        last unit runs it alone)."""
        h = self.model._ln(hidden, "ln_f")   # (B, T, C)
        lengths = y[:, 1]
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        else:   # the real tokens' mean: padding masked out
            real = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            pooled = (h * real[:, :, None]).sum(1) / lengths[:, None].to(h.dtype)
        return torch.addmm(self.model.p("cls.bias"), pooled, self.model.p("cls.weight"))

    def _per_example(self, logits, labels):
        per = F.cross_entropy(logits, labels, reduction="none")
        return per if self.weights is None else per * self.weights.to(per.device)[labels]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean over the batch of the weighted per-example cross-entropy."""
        return self._per_example(self.logits(x, y), y[:, 0]).mean()

    def loss_from_hidden(self, hidden: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._per_example(self.head_logits(hidden, y), y[:, 0]).mean()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> EvalResult:
        self.model.eval()
        return self._result(self.logits(x, y), y)

    @torch.no_grad()
    def evaluate_hidden(self, hidden: torch.Tensor, y: torch.Tensor) -> EvalResult:
        return self._result(self.head_logits(hidden, y), y)

    def _result(self, logits, y) -> EvalResult:
        labels = y[:, 0]
        loss_sum = self._per_example(logits, labels).sum()
        correct = (logits.argmax(-1) == labels).sum()
        return EvalResult(float(loss_sum), int(correct), int(labels.numel()), logits=to_host(logits))
