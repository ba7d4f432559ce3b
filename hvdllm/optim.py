"""AdamW on flat float32 numpy vectors: the one optimizer the core's strategies (ZeRO-1, local SGD's
outer step, parameter servers) run, with torch.optim.AdamW's arithmetic exactly:

    p *= 1 - lr*wd              (only where decay_mask, i.e. parameters with ndim >= 2)
    m  = b1*m + (1-b1)*g
    v  = b2*v + (1-b2)*g^2
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
"""
from __future__ import annotations

import math

import numpy as np


class FlatAdamW:
    def __init__(self, n: int, decay_mask: np.ndarray, optim_cfg):
        self.cfg = optim_cfg
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)
        self.wd = (decay_mask.astype(np.float32) * optim_cfg.weight_decay)
        self.t = 0

    def step(self, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        """Update p in place from gradient g."""
        o = self.cfg
        self.t += 1
        p *= 1.0 - lr * self.wd
        self.m *= o.beta1
        self.m += (1.0 - o.beta1) * g
        self.v *= o.beta2
        self.v += (1.0 - o.beta2) * g * g
        bc1 = 1.0 - o.beta1 ** self.t
        bc2 = 1.0 - o.beta2 ** self.t
        denom = np.sqrt(self.v) / math.sqrt(bc2) + o.eps
        p -= np.float32(lr / bc1) * (self.m / denom)

    def state(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load(self, m: np.ndarray, v: np.ndarray, t: int) -> None:
        self.m[:] = m
        self.v[:] = v
        self.t = int(t)


def clip_coef(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 0 disables."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
