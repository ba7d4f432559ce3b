"""LoRA adapters in torch (hvdllm/lora.py writes what they compute): the model reads each
targeted weight as W + s * A^T B^T (GPT.p), the base parameters are frozen. Under
finetune.lora_dropout > 0 a training forward runs them beside the weight instead (GPT._xw):
x @ W + s * (dropout(x) @ A^T) @ B^T, the mask from torch's global generator, as model.dropout's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hvdllm import lora, task


class Adapters(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        values = lora.init_adapters(cfg)
        self.names, self.scale = list(values), lora.scale(cfg)
        self.plist = nn.ParameterList([nn.Parameter(torch.from_numpy(v)) for v in values.values()])
        self.index = {n: i for i, n in enumerate(self.names)}
        self.targets = set(lora.targets(cfg))
        # the unfolded path in training: needed for a dropout (p > 0); a test sets it at p = 0 to
        # compare it with the folded one
        self.dropout = lora.dropout(cfg)
        self.unfold = self.dropout > 0

    def _ab(self, name: str):
        return self.plist[self.index[lora.a_name(name)]], self.plist[self.index[lora.b_name(name)]]

    def weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in self.targets:
            return w
        a, b = self._ab(name)
        return w + self.scale * (a.t() @ b.t())

    def beside(self, name: str, training: bool) -> bool:
        """Does `name`'s product run unfolded (x @ W + side(x)) rather than through weight()?"""
        return self.unfold and training and name in self.targets

    def side(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s * (dropout(x) @ A^T) @ B^T: the adapters' term of x @ (W + s A^T B^T), the input dropped."""
        a, b = self._ab(name)
        if self.dropout:
            x = F.dropout(x, self.dropout, True)
        return self.scale * ((x @ a.t()) @ b.t())


def attach(model, cfg) -> list:
    """Adapters on `model` (a GPT); every base parameter frozen. Returns the trainable
    [(name, parameter)]: the adapters, then a classifier's head."""
    model.adapters = Adapters(cfg)
    head = set(task.HEAD) if task.is_classify(cfg) else set()
    for n, p in model.named():
        p.requires_grad_(n in head)
    return [(n, model.adapters.plist[i]) for i, n in enumerate(model.adapters.names)] + \
        [(n, p) for n, p in model.named() if n in head]
