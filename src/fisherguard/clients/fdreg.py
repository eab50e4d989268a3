"""SDFC's client-side Fisher Discrepancy Regulariser FDReg (Huang et al., ECCV 2024, Eq. 9)."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


class FDReg:
    """penalty(w) = λ·Σ_v H_v·(w_v − w̄_v)² with H and the anchor w̄ constant (SDFC Eq. 9; docs/algorithms.md §5.2).

    No ½ and no normalisation, so the gradient is 2λ·H ⊙ (w − w̄). Implements the ``Regulariser``
    protocol of ``clients.regulariser``; ``params`` arrive in docs/protocol.md §6 order.
    """

    kind = "fdreg"

    def __init__(self, importance: Tensor, anchor: Tensor, lam: float) -> None:
        if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if importance.dim() != 1 or anchor.dim() != 1 or importance.numel() != anchor.numel():
            raise ValueError(f"importance and anchor must be flat vectors of one length, got "
                             f"{tuple(importance.shape)} and {tuple(anchor.shape)}")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError("importance H must be finite and non-negative")
        if not bool(torch.isfinite(anchor).all()):
            raise ValueError("anchor must be finite")
        self.lam = float(lam)
        self.importance = importance.detach().clone()
        self.anchor = anchor.detach().clone()
        self._split: tuple[tuple[torch.Size, ...], list[Tensor], list[Tensor]] | None = None

    def _pieces(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        shapes = tuple(p.shape for p in params)
        if self._split is None or self._split[0] != shapes or (
                self._split[1] and self._split[1][0].dtype != params[0].dtype):
            total = sum(p.numel() for p in params)
            if total != self.anchor.numel():
                raise ValueError(f"parameters have {total} entries, FDReg was built for "
                                 f"{self.anchor.numel()}")
            dev, dt = params[0].device, params[0].dtype
            # λ folded into H and both split per tensor once, not on every mini-batch
            scaled = (self.lam * self.importance.to(torch.float64)).to(device=dev, dtype=dt)
            anchor = self.anchor.to(device=dev, dtype=dt)
            sizes = [p.numel() for p in params]
            hs = [h.view(s) for h, s in zip(torch.split(scaled, sizes), shapes)]
            ws = [a.view(s) for a, s in zip(torch.split(anchor, sizes), shapes)]
            self._split = (shapes, hs, ws)
        return self._split[1], self._split[2]

    def penalty(self, params: Sequence[Tensor]) -> Tensor:
        """λ·Σ_v H_v (w_v − w̄_v)², differentiable w.r.t. ``params`` (SDFC Eq. 9)."""
        params = list(params)
        if not params:
            raise ValueError("FDReg.penalty needs the model's parameters")
        hs, ws = self._pieces(params)
        total = params[0].new_zeros(())
        for p, h, w in zip(params, hs, ws):
            total = total + (h * (p - w).square()).sum()
        return total
