"""The interface of a client-side loss term a defense hands to the clients (``ClientPlan``).

It lives in the clients room so that local training never imports the defenses: the defenses
(SDFC's FDReg, RSA's L1 pull) build regularisers, the trainers only call ``penalty``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

Tensor = torch.Tensor


class Regulariser(Protocol):
    """A client-side loss term added to each mini-batch's cross-entropy (SDFC's FDReg, RSA's L1)."""

    kind: str

    def penalty(self, params: Sequence[Tensor]) -> Tensor:
        """Scalar added to the loss; ``params`` are the model's parameters in docs/protocol.md §6 order."""
