"""hvdllm/optim.py: FlatAdamW (numpy in place: parameter servers) and DeviceAdamW (the same
formula, adamw_update, on any backend's flat vectors: ZeRO-1's shard) against torch.optim.AdamW,
step by step, with decay only where the mask says, a changing lr and the moments compared too;
the two bit-identical on numpy, DeviceAdamW on tf tensors equal to them, on torch tensors (its
fused kernel) equal to torch.optim.AdamW(fused=True); clip_coef
against torch.nn.utils.clip_grad_norm_."""
import numpy as np
import pytest
import torch

from hvdllm.config import OptimConfig
from hvdllm.flat import NUMPY
from hvdllm.optim import DeviceAdamW, FlatAdamW, clip_coef, decay_runs

CONFIGS = [(0.1, (0.9, 0.95), 1e-8), (0.0, (0.8, 0.999), 1e-6), (0.5, (0.9, 0.95), 1e-3)]
LRS = [1e-3, 3e-3, 1e-2, 5e-3, 2e-3, 1e-4]


@pytest.mark.parametrize("wd,betas,eps", CONFIGS)
def test_flat_adamw_equals_torch_adamw(wd, betas, eps):
    cfg = OptimConfig(weight_decay=wd, beta1=betas[0], beta2=betas[1], eps=eps)
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    w, b = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                            lr=1.0, betas=betas, eps=eps)
    flat = np.concatenate([w0.ravel(), b0])
    mask = np.r_[np.ones(20, bool), np.zeros(7, bool)]
    mine = FlatAdamW(27, mask, cfg)
    for t, lr in enumerate(LRS):
        g = rng.normal(size=27).astype(np.float32) * (10.0 ** (t % 3 - 1))
        w.grad, b.grad = torch.tensor(g[:20].reshape(5, 4)), torch.tensor(g[20:])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        mine.step(flat, g, lr)
        want = np.concatenate([w.detach().numpy().ravel(), b.detach().numpy()])
        np.testing.assert_allclose(flat, want, rtol=1e-6, atol=3e-7, err_msg=f"step {t + 1}")   # ~2 ulp at 1
    m = np.concatenate([opt.state[w]["exp_avg"].numpy().ravel(), opt.state[b]["exp_avg"].numpy()])
    v = np.concatenate([opt.state[w]["exp_avg_sq"].numpy().ravel(), opt.state[b]["exp_avg_sq"].numpy()])
    # torch forms m by lerp (m + (1-b1)(g-m)), FlatAdamW as b1*m + (1-b1)*g: float32 rounding
    # differs where the two terms cancel, so the tolerance is absolute at the gradients' scale
    np.testing.assert_allclose(mine.m, m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mine.v, v, rtol=1e-6, atol=1e-9)
    assert mine.t == 6


def test_decay_mask_is_what_decays():
    """With a zero gradient only the masked elements move (by the decoupled decay)."""
    cfg = OptimConfig(weight_decay=0.5)
    p = np.ones(4, np.float32)
    FlatAdamW(4, np.array([1, 0, 1, 0], bool), cfg).step(p, np.zeros(4, np.float32), 0.1)
    np.testing.assert_allclose(p, [0.95, 1.0, 0.95, 1.0], rtol=1e-7)


@pytest.mark.parametrize("max_norm", [0.0, 0.1, 1.0, 1e3])
def test_clip_coef_equals_torch_clip_grad_norm(max_norm):
    g = torch.tensor(np.random.default_rng(1).normal(size=50).astype(np.float32))
    norm = float(torch.linalg.vector_norm(g))
    coef = clip_coef(norm, max_norm)
    if max_norm <= 0:
        assert coef == 1.0
        return
    t = g.clone().requires_grad_(True)
    t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([t], max_norm)
    np.testing.assert_allclose(g.numpy() * np.float32(coef), t.grad.numpy(), rtol=1e-6)


def trajectory(opt, p, gs, lrs, in_place):
    """Parameters after each step (numpy copies)."""
    out = []
    for g, lr in zip(gs, lrs):
        if in_place:
            opt.step(p, g, lr)
        else:
            p = opt.step(p, g, lr)
        out.append(np.array(p))
    return out


def problem(n=27, steps=len(LRS), seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < 0.6
    p = rng.normal(size=n).astype(np.float32)
    gs = [rng.normal(size=n).astype(np.float32) * np.float32(10.0 ** (t % 3 - 1)) for t in range(steps)]
    return mask, p, gs


@pytest.mark.parametrize("wd,betas,eps", CONFIGS)
def test_device_adamw_on_numpy_is_flat_adamw_bit_for_bit(wd, betas, eps):
    """One formula: adamw_update's operations are FlatAdamW's in-place ones, in the same order."""
    cfg = OptimConfig(weight_decay=wd, beta1=betas[0], beta2=betas[1], eps=eps)
    mask, p, gs = problem()
    flat, dev = FlatAdamW(p.size, mask, cfg), DeviceAdamW(p.size, mask, cfg, NUMPY)
    for a, b in zip(trajectory(flat, p.copy(), gs, LRS, True), trajectory(dev, p.copy(), gs, LRS, False)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(flat.m, dev.m)
    np.testing.assert_array_equal(flat.v, dev.v)
    assert flat.t == dev.t == len(LRS)


def backend_ops(name):
    if name == "torch":
        from torch_backend.collectives import TorchOps
        return TorchOps(), lambda a: torch.from_numpy(a.copy()), lambda t: t.numpy()
    tf = pytest.importorskip("tensorflow")
    from tf_backend.collectives import TFOps
    return TFOps(), lambda a: tf.constant(a), lambda t: t.numpy()


def torch_fused_trajectory(mask, p, gs, lrs, cfg):
    """torch.optim.AdamW(fused=True) on the mask's runs as parameters, decayed and undecayed runs
    as two groups: (parameters after each step, final m, final v), as flat numpy."""
    decayed, undecayed = decay_runs(mask)
    order = sorted(decayed + undecayed)
    ts = {r: torch.tensor(p[r[0]:r[1]], requires_grad=True) for r in order}
    opt = torch.optim.AdamW([{"params": [ts[r] for r in decayed], "weight_decay": cfg.weight_decay},
                             {"params": [ts[r] for r in undecayed], "weight_decay": 0.0}],
                            lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    out = []
    for g, lr in zip(gs, lrs):
        for r in order:
            ts[r].grad = torch.from_numpy(g[r[0]:r[1]].copy())
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        out.append(np.concatenate([ts[r].detach().numpy() for r in order]))
    m, v = (np.concatenate([opt.state[ts[r]][k].numpy() for r in order]) for k in ("exp_avg", "exp_avg_sq"))
    return out, m, v


def test_decay_runs_cover_the_mask():
    mask = np.array([1, 1, 0, 1, 0, 0, 1], bool)
    assert decay_runs(mask) == ([(0, 2), (3, 4), (6, 7)], [(2, 3), (4, 6)])
    assert decay_runs(np.zeros(3, bool)) == ([], [(0, 3)])


@pytest.mark.parametrize("name", ["torch", "tensorflow"])
@pytest.mark.parametrize("wd,betas,eps", CONFIGS)
def test_device_adamw_on_backend_tensors_equals_reference(name, wd, betas, eps):
    """The backends' own tensors, bit for bit against their reference: TensorFlow runs
    adamw_update, FlatAdamW's trajectory and moments (every operation is one elementwise IEEE
    float32 operation, in every framework, on the CPU); torch runs its fused AdamW kernel on the
    flat vector's runs (TorchOps.adamw_), torch.optim.AdamW(fused=True)'s trajectory and moments
    over the same runs as parameters. The state read back to the host as numpy, and loaded back."""
    ops, tensor, numpy = backend_ops(name)
    cfg = OptimConfig(weight_decay=wd, beta1=betas[0], beta2=betas[1], eps=eps)
    mask, p, gs = problem()
    dev = DeviceAdamW(p.size, mask, cfg, ops)
    if name == "torch":
        want, want_m, want_v = torch_fused_trajectory(mask, p, gs, LRS, cfg)
    else:
        flat = FlatAdamW(p.size, mask, cfg)
        want = trajectory(flat, p.copy(), gs, LRS, True)
        want_m, want_v = flat.m, flat.v
    q = tensor(p)
    for t, (g, lr) in enumerate(zip(gs, LRS)):
        q = dev.step(q, tensor(g), lr)
        assert not isinstance(q, np.ndarray)
        np.testing.assert_array_equal(numpy(q), want[t], err_msg=f"step {t + 1}")
    st = dev.state()
    assert isinstance(st["m"], np.ndarray) and st["t"] == len(LRS)
    np.testing.assert_array_equal(st["m"], want_m)
    np.testing.assert_array_equal(st["v"], want_v)
    again = DeviceAdamW(p.size, mask, cfg, ops)
    again.load(st["m"], st["v"], st["t"])
    g, lr, q = gs[0], 1e-3, numpy(q)   # (step may update its p in place: each gets its own)
    np.testing.assert_array_equal(numpy(again.step(tensor(q), tensor(g), lr)),
                                  numpy(dev.step(tensor(q), tensor(g), lr)))
