"""LoRA adapters in torch (hvdllm/lora.py writes what they compute): the model reads each
targeted weight as W + s * A^T B^T (GPT.p), the base parameters are frozen."""
from __future__ import annotations

import torch
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

    def weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in self.targets:
            return w
        a, b = self.plist[self.index[lora.a_name(name)]], self.plist[self.index[lora.b_name(name)]]
        return w + self.scale * (a.t() @ b.t())


def attach(model, cfg) -> list:
    """Adapters on `model` (a GPT); every base parameter frozen. Returns the trainable
    [(name, parameter)]: the adapters, then a classifier's head."""
    model.adapters = Adapters(cfg)
    head = set(task.HEAD) if task.is_classify(cfg) else set()
    for n, p in model.named():
        p.requires_grad_(n in head)
    return [(n, model.adapters.plist[i]) for i, n in enumerate(model.adapters.names)] + \
        [(n, p) for n, p in model.named() if n in head]
