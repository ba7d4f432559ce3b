"""Local SGD / periodic model averaging, with an optional outer optimizer (DiLoCo).

Ranks take optimizer steps on their own gradients with no communication. Every `every` (H)
steps one message: an allreduce (average) of the flat parameters over the dp group,
theta_avg = 1/k sum_i theta_i. Communication per step is therefore 1/H of synchronous DP's.

With outer_lr = 1 and outer_momentum = 0 the averaged parameters are taken as they are. Otherwise
(DiLoCo, Douillard et al. 2023) the averaged change is an outer gradient:
    delta = anchor - theta_avg;  buf = mu*buf + delta
    update = delta + mu*buf (Nesterov) or buf;   theta = anchor - outer_lr*update;  anchor = theta
"""
from __future__ import annotations

import numpy as np


class LocalSGD:
    def __init__(self, cfg, comm, initial_flat: np.ndarray):
        self.every, self.comm = cfg.every, comm
        self.outer_lr, self.mu, self.nesterov = cfg.outer_lr, cfg.outer_momentum, cfg.nesterov
        self.anchor = initial_flat.copy()
        self.buf = np.zeros_like(initial_flat)
        self.syncs = 0

    def due(self, step_done: int, last_step: int) -> bool:
        return step_done % self.every == 0 or step_done == last_step

    def sync(self, flat_params: np.ndarray) -> np.ndarray:
        """Average over the dp group (and apply the outer step); returns the new parameters."""
        avg = self.comm.allreduce(flat_params, op="average", name="localsgd.params")
        self.syncs += 1
        if self.outer_lr == 1.0 and self.mu == 0.0:
            self.anchor = avg
            return avg.copy()
        delta = self.anchor - avg
        self.buf = self.mu * self.buf + delta
        update = delta + self.mu * self.buf if self.nesterov else self.buf
        self.anchor = (self.anchor - self.outer_lr * update).astype(np.float32)
        return self.anchor.copy()

    def state(self) -> dict[str, np.ndarray]:
        return {"localsgd.anchor": self.anchor, "localsgd.buf": self.buf}

    def load(self, state: dict) -> None:
        if "localsgd.anchor" in state:
            self.anchor = np.asarray(state["localsgd.anchor"], np.float32).copy()
            self.buf = np.asarray(state["localsgd.buf"], np.float32).copy()
