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

One contract for both tasks (task.kind, hvdllm/task.py; the engine knows it from cfg):
- 'lm': x, y (B, T) int64, y the next tokens; the loss is the mean token cross-entropy and
  evaluate reports summed token losses, right next-token predictions and tokens.
- 'classify': x (B, T) int64 right-padded token ids, y (B, 2) int64 = [label, length] (length >= 1
  real tokens; padding is never read: the model is causal). The model is
  hvdllm.task.model_config(cfg): the backbone plus cls.weight / cls.bias; the loss is the mean over
  the B examples of class_weight[label] * cross-entropy of the pooled head's logits. evaluate
  reports the summed example losses, right predictions, examples, and `logits` (B, num_labels)
  float32 on the host (what distributed evaluation and `hvdllm predict` read). train_step,
  evaluate and everything else keep their signatures and collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StepResult:
    """loss: mean training loss of this step, averaged over the data-parallel group; grad_norm:
    global gradient norm before clipping (after aggregation); skipped: train.precision = 'fp16',
    the gradients overflowed, no update (loss_scale.py).

    An engine may hand loss and grad_norm over as 0-d tensors still on its device: reading one
    (`res.loss`) converts it to a float once, which waits for the device. So a step nobody reads
    is never synchronised for them; the trainer reads them only on the steps it logs."""

    def __init__(self, loss, grad_norm, skipped: bool = False):
        self._raw = {"loss": loss, "grad_norm": grad_norm}
        self.skipped = skipped

    def _read(self, key: str) -> float:
        v = self._raw[key]
        if not isinstance(v, float):
            v = self._raw[key] = float(v)
        return v

    loss = property(lambda self: self._read("loss"))
    grad_norm = property(lambda self: self._read("grad_norm"))


@dataclass
class EvalResult:
    loss_sum: float    # summed token losses on this rank
    correct: int       # next-token predictions that were right on this rank
    tokens: int        # tokens evaluated on this rank (classify: examples)
    logits: np.ndarray | None = None   # classify: (B, num_labels) float32; None for 'lm'


class Engine(Protocol):
    """Everything the core (trainer.py, strategies/roles.py, strategies/ps_worker.py, generate.py,
    the benchmarks) calls on an engine. Engines are built only by hvdllm/parallelize.py:
    `backend.Engine(cfg, layout, collectives, tp)` (`backend.ShardedEngine`, the same arguments,
    for parallel.zero >= 2), `backend.PipelineEngine(cfg, layout, rt, tp)` (`backend.ShardedPipelineEngine`
    for parallel.zero >= 2),
    `backend.SequentialEngine(cfg, layout, rt)`, and `PSWorker(engine, cfg, layout, rt)` around any
    of them. What they share is written once in hvdllm/engines.py; each backend supplies the
    primitives listed there."""

    # traits: declared by every engine (hvdllm.engines.EngineBase has the defaults)
    lockstep: bool          # every trainer steps together (False: async parameter-server workers)
    max_steps: int | None   # None: train.steps; async workers: the servers' shared budget
    param_shapes: dict      # {name: whole shape}: what a checkpoint must match

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        """One optimizer step on int arrays (batch, block); reduces gradients over the dp group."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Forward only, no state change (every stage of a pipeline reports the same numbers)."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small float64 vector over the data-parallel group (metrics)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole state: parameters under their names, AdamW moments as 'optim.m.<name>' /
        'optim.v.<name>', and 'optim.step' (0-d int64); float32 numpy arrays, the same in both
        backends. Collective over the tp group, the pipeline and (ZeRO-1) the dp group; in a
        pipeline the whole model arrives on the first stage."""

    def shard_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(this rank's arrays, {name: placement}) for a sharded checkpoint (checkpoint.py)."""

    def load_state_dict(self, state) -> None:
        """Inverse of state_dict, from whole arrays or a checkpoint.Sharded (only this rank's
        slices are read); a state without optim.* keys loads parameters only."""

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole parameters without optimizer state (snapshots for role ranks; collective
        like state_dict)."""

    def local_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(this rank's mean loss, flat gradient) with no communication (parameter servers;
        built-in GPT only)."""

    def flat_params(self) -> np.ndarray:
        """All parameters as one float32 vector in hvdllm.params order (hvdllm.flat)."""

    def set_flat_params(self, flat: np.ndarray) -> None:
        """Inverse of flat_params."""

    def num_params(self) -> int:
        """Parameters this rank holds."""

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (ZeRO-1: its shard)."""

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> list[int]:
        """Sample continuation tokens (deterministic given seed; collective under tp and pp)."""

    def close(self) -> None:
        """End of training (parameter-server workers end the servers)."""
