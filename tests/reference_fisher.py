"""Fisher estimators only the tests use: a deliberately wrong reference next to the real ones.

``minibatch_square_fisher`` squares mini-batch mean gradients instead of per-sample gradients
(docs/algorithms.md §2.2); the tests show how far it is from ``fisherguard.fisher.diagonal_fisher``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fisherguard.fisher import _chunks, _functional_state, _mode

Tensor = torch.Tensor


def minibatch_square_fisher(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, *,
                            batch_size: int = 64) -> Tensor:
    """Test reference only, a wrong estimator: Σ_b (B_b/n)·(mean_{i∈b} s_i)², in order, last batch kept (docs/algorithms.md §2.2)."""
    params, buffers = _functional_state(model, weights, requires_grad=True)
    names = list(params)
    acc = [torch.zeros_like(params[k], dtype=torch.float32) for k in names]
    n = int(x.shape[0])
    with _mode(model, False):
        for sl in _chunks(n, batch_size):
            xb, yb = x[sl], y[sl].long()
            out = functional_call(model, (params, buffers), (xb,))
            ll = F.log_softmax(out, dim=-1).gather(1, yb.unsqueeze(1)).mean()
            grads = torch.autograd.grad(ll, [params[k] for k in names], allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += (xb.shape[0] / n) * g.float().square()
    return torch.cat([a.reshape(-1) for a in acc])
