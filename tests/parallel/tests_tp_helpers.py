"""Backend-specific loss-and-gradients for check_tp.py (one function per framework)."""
import numpy as np


def loss_and_grads(be, model_cfg, tp, x, y):
    if be.__name__ == "torch_backend":
        import torch
        if tp is not None:
            tp.counts = {"forward": 0, "backward": 0}
        model = be.GPT(model_cfg, 0, tp=tp)
        loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named()}
        return float(loss.detach()), grads, dict(tp.counts) if tp is not None else {}
    import tensorflow as tf
    if tp is not None:
        tp.counts = {"forward": 0, "backward": 0}
    model = be.GPT(model_cfg, 0, tp=tp)
    with tf.GradientTape() as tape:
        loss = model.loss(tf.constant(x), tf.constant(y))
    names = list(model.params)
    grads = tape.gradient(loss, [model.params[n] for n in names])
    return float(loss), {n: np.asarray(g) for n, g in zip(names, grads)}, dict(tp.counts) if tp is not None else {}
