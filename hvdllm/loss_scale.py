"""Dynamic loss scaling for train.precision = 'fp16' (Micikevicius et al. 2018; the rules of
torch.amp.GradScaler). The loss is multiplied by `scale` before backward, so that small float16
gradients do not flush to zero, and the gradients are divided by it again before clipping and
AdamW. A step whose gradient norm, taken after the dp (and tp) reduction, is not finite is
skipped and the scale halves; after `window` finite steps in a row it doubles. That norm is the
whole job's: summed over the dp group, the tp group and (parallel.pp) every pipeline stage, and
under ZeRO-1/2/3 over the shards (strategies/zero.py, strategies/zero_sharded.py), so an
overflow on any one rank makes it non-finite on all: every rank skips the same step, with no
message of its own, and the scale stays the same everywhere. The scaler's state travels in the
checkpoint's manifest (Trainer.save), so a resume continues with the scale the interrupted run
had (sharded checkpoints too)."""
from __future__ import annotations


class LossScaler:
    def __init__(self, init: float = 2.0 ** 16, window: int = 2000, factor: float = 2.0):
        self.scale, self.window, self.factor = float(init), int(window), float(factor)
        self.good = 0   # finite steps since the scale last changed

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good = self.scale / self.factor, 0
            return
        self.good += 1
        if self.good >= self.window:
            self.scale, self.good = self.scale * self.factor, 0

    def state(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load(self, state: dict) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])
