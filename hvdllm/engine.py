"""The contract between the framework-neutral core and a backend (torch_backend, tf_backend).

The core (trainer.py) owns the loop: which batch, which learning rate, when to evaluate, log and
checkpoint. A backend's Engine owns the arithmetic: forward, backward, the gradient aggregation
the core's policy asks for (through Horovod), clipping and the AdamW update. Both backends expose
the same names with the same arguments and the same numerics:

- GPT: pre-LN blocks (LayerNorm eps 1e-5, causal self-attention, MLP with tanh-GELU, 4x width),
  learned position embeddings, final LayerNorm, logits = h @ wte.T (tied embeddings); mean
  cross-entropy over every token. Parameters named and shaped as hvdllm.params.param_shapes,
  initialised from hvdllm.params.init_params(model_cfg, seed) (identical in both frameworks).
- AdamW as torch.optim.AdamW: p *= 1 - lr*wd (only ndim >= 2 parameters);
  m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
- clipping: coef = min(1, grad_clip / (||g||_2 + 1e-6)) over all gradients, after aggregation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class StepResult:
    loss: float        # mean training loss of this step, averaged over the data-parallel group
    grad_norm: float   # global gradient norm before clipping (after aggregation)


@dataclass
class EvalResult:
    loss_sum: float    # summed token losses on this rank
    correct: int       # next-token predictions that were right on this rank
    tokens: int        # tokens evaluated on this rank


class Engine(Protocol):
    """What trainer.py needs from a backend. Constructed as Engine(cfg, layout, seed)."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        """One optimizer step on int arrays (batch, block); reduces gradients over the dp group."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Forward only, no state change."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small float64 vector over the data-parallel group (metrics)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters under their names, AdamW moments as 'optim.m.<name>' / 'optim.v.<name>',
        and 'optim.step' (0-d int64). float32 numpy arrays, the same in both backends."""

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state_dict; a state without optim.* keys loads parameters only."""

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, flat gradient) with no communication (parameter servers)."""

    def flat_params(self) -> np.ndarray:
        """All parameters as one float32 vector in hvdllm.params order (hvdllm.flat)."""

    def set_flat_params(self, flat: np.ndarray) -> None:
        """Inverse of flat_params."""

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> list[int]:
        """Sample continuation tokens (deterministic given seed)."""
