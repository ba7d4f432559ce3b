"""torch.optim.AdamW state <-> the neutral checkpoint names ('optim.m.<name>', 'optim.v.<name>',
'optim.step'), shared by the data-parallel and pipeline engines."""
from __future__ import annotations

import numpy as np
import torch


def make_adamw(named_params, optim_cfg) -> torch.optim.AdamW:
    """Weight decay on ndim >= 2 parameters only, as hvdllm.engine specifies."""
    o = optim_cfg
    params = [p for _, p in named_params]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        # on CUDA the fused kernel (one launch for every tensor); elsewhere the foreach one
        **({"fused": True} if params and all(p.is_cuda for p in params) else {"foreach": True}),
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def export(opt, named_params) -> dict[str, np.ndarray]:
    out, step = {}, 0
    for n, p in named_params:
        s = opt.state.get(p)
        if s:
            out[f"optim.m.{n}"] = s["exp_avg"].cpu().numpy().copy()
            out[f"optim.v.{n}"] = s["exp_avg_sq"].cpu().numpy().copy()
            step = int(s["step"])
    out["optim.step"] = np.array(step, dtype=np.int64)
    return out


def load(opt, named_params, state: dict) -> None:
    step = int(state.get("optim.step", 0))
    if step == 0:
        return
    for n, p in named_params:
        if f"optim.m.{n}" in state:
            # the moments where the parameter is; the step count stays on the CPU (foreach AdamW)
            opt.state[p] = {"step": torch.tensor(float(step)),
                            "exp_avg": torch.from_numpy(np.array(state[f"optim.m.{n}"], np.float32)).to(p.device),
                            "exp_avg_sq": torch.from_numpy(np.array(state[f"optim.v.{n}"], np.float32)).to(p.device)}


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
