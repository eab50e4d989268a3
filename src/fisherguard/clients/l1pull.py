"""RSA's client-side L1 pull towards the server model, Li et al., AAAI 2019 (docs/baselines.md §3.12)."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


class L1Pull:
    """penalty(x) = λ·‖x − w_server‖₁, whose subgradient λ·sign(x − w) is RSA's worker term
    (Li et al. 2019, Eq. 7); implements the ``Regulariser`` protocol of ``clients.regulariser``."""

    kind = "l1pull"

    def __init__(self, lam: float, anchor: Tensor) -> None:
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if anchor.dim() != 1:
            raise ValueError(f"anchor must be a flat (P,) vector, got shape {tuple(anchor.shape)}")
        self.lam = float(lam)
        self.anchor = anchor.detach().clone()

    def penalty(self, params: Sequence[Tensor]) -> Tensor:
        """λ·Σ|w − w_server| over all parameters, differentiable w.r.t. ``params``."""
        flat = torch.cat([p.reshape(-1) for p in params])
        if flat.numel() != self.anchor.numel():
            raise ValueError(f"parameters have {flat.numel()} entries, the anchor "
                             f"{self.anchor.numel()}")
        anchor = self.anchor.to(device=flat.device, dtype=flat.dtype)
        return self.lam * (flat - anchor).abs().sum()
