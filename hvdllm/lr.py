"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr at the last step."""
import math


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    o = optim_cfg
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)
