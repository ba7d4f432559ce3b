"""A GPT in PyTorch with the framework-neutral parameter layout of hvdllm.params.

Weights are (in, out) and applied as x @ W + b, so the same numpy arrays load into the
TensorFlow twin; initial values come from hvdllm.params.init_params (same seed, same weights).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from hvdllm.params import init_params, param_shapes


class GPT(nn.Module):
    def __init__(self, model_cfg, seed: int):
        super().__init__()
        self.cfg = model_cfg
        values = init_params(model_cfg, seed)
        # ParameterDict keys may not contain '.', so parameters live in a list and names map to it.
        self.names = list(param_shapes(model_cfg.n_layer, model_cfg.n_embd, model_cfg.vocab_size,
                                       model_cfg.block_size))
        self.plist = nn.ParameterList([nn.Parameter(torch.from_numpy(values[n].copy())) for n in self.names])
        self.index = {n: i for i, n in enumerate(self.names)}

    def p(self, name: str) -> torch.Tensor:
        return self.plist[self.index[name]]

    def named(self):
        """(name, parameter) in canonical order."""
        return [(n, self.plist[i]) for i, n in enumerate(self.names)]

    def _ln(self, x, prefix):
        return F.layer_norm(x, (x.shape[-1],), self.p(prefix + ".weight"), self.p(prefix + ".bias"), 1e-5)

    def _linear(self, x, prefix):
        return torch.addmm(self.p(prefix + ".bias"), x.reshape(-1, x.shape[-1]),
                           self.p(prefix + ".weight")).view(*x.shape[:-1], -1)

    def _attn(self, x, h):
        B, T, C = x.shape
        nh = self.cfg.n_head
        q, k, v = self._linear(x, h + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        drop = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self._dropout(self._linear(y, h + "attn.c_proj"))

    def _mlp(self, x, h):
        x = F.gelu(self._linear(x, h + "mlp.c_fc"), approximate="tanh")
        return self._dropout(self._linear(x, h + "mlp.c_proj"))

    def _dropout(self, x):
        return F.dropout(x, self.cfg.dropout, self.training) if self.cfg.dropout else x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab)."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.cfg.block_size}")
        x = self._dropout(self.p("wte")[idx] + self.p("wpe")[:T])
        for i in range(self.cfg.n_layer):
            h = f"h.{i}."
            x = x + self._attn(self._ln(x, h + "ln_1"), h)
            x = x + self._mlp(self._ln(x, h + "ln_2"), h)
        x = self._ln(x, "ln_f")
        return x @ self.p("wte").t()

    def loss(self, idx, targets) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def flops_per_token(model_cfg) -> float:
    """Training FLOPs per token (6N + attention), as in the PaLM appendix; for MFU figures."""
    from hvdllm.params import count
    m = model_cfg
    return 6 * count(m) + 12 * m.n_layer * m.n_embd * m.block_size


__all__ = ["GPT", "flops_per_token"]
