"""Local SGD / periodic model averaging, with an optional outer optimizer (DiLoCo).

Ranks take optimizer steps on their own gradients with no communication. Every `every` (H)
steps one message: an allreduce (average) of the flat parameters over the dp group,
theta_avg = 1/k sum_i theta_i. Communication per step is therefore 1/H of synchronous DP's.

With outer_lr = 1 and outer_momentum = 0 the averaged parameters are taken as they are. Otherwise
(DiLoCo, Douillard et al. 2023) the averaged change is an outer gradient:
    delta = anchor - theta_avg;  buf = mu*buf + delta
    update = delta + mu*buf (Nesterov) or buf;   theta = anchor - outer_lr*update;  anchor = theta

train.precision = 'fp16': a rank whose gradients overflow skips its own step and halves its own
loss scale (the engines' norm is that rank's, not reduced): between averages every rank steps
alone, as a single process on its data would, and a job-wide skip would cost one allreduce per
step, the message local SGD exists to save. So the ranks' scales may differ for the rest of the
run; the scale never reaches the weights (the gradients are unscaled before AdamW), so the
average is not affected, and a resume gives every rank rank 0's scale (the checkpoint's, with
rank 0's weights and moments).

The vectors (parameters, anchor, momentum buffer) are the backend's own, moved by its tensor
Collectives, never written in place (so the vector sync returns may be the anchor itself); they
come to the host only for a checkpoint (state, load).
"""
from __future__ import annotations

import numpy as np

from ..flat import ops_of


class LocalSGD:
    def __init__(self, cfg, comm, initial_flat):
        """`comm`: the dp group's Collectives (their `ops`: hvdllm/flat.py); `initial_flat`: the
        parameters the run starts from, the backend's flat vector (not written afterwards)."""
        self.every, self.comm, self.ops = cfg.every, comm, ops_of(comm)
        self.outer_lr, self.mu, self.nesterov = cfg.outer_lr, cfg.outer_momentum, cfg.nesterov
        self.anchor = initial_flat
        self.buf = self.ops.zeros(int(initial_flat.shape[0]))
        self.syncs = 0

    def due(self, step_done: int, last_step: int) -> bool:
        return step_done % self.every == 0 or step_done == last_step

    def sync(self, flat_params):
        """Average over the dp group (and apply the outer step); returns the new parameters
        (the caller copies them into its model, or keeps them unchanged)."""
        avg = self.comm.allreduce(flat_params, op="average", name="localsgd.params")
        self.syncs += 1
        if self.outer_lr == 1.0 and self.mu == 0.0:
            self.anchor = avg
            return avg
        delta = self.anchor - avg
        self.buf = self.mu * self.buf + delta
        update = delta + self.mu * self.buf if self.nesterov else self.buf
        self.anchor = self.anchor - self.outer_lr * update
        return self.anchor

    def state(self) -> dict[str, np.ndarray]:
        """Host copies (checkpoints)."""
        return {"localsgd.anchor": self.ops.to_host(self.anchor), "localsgd.buf": self.ops.to_host(self.buf)}

    def load(self, state: dict) -> None:
        if "localsgd.anchor" in state:
            self.anchor = self.ops.from_host(np.asarray(state["localsgd.anchor"], np.float32))
            self.buf = self.ops.from_host(np.asarray(state["localsgd.buf"], np.float32))
