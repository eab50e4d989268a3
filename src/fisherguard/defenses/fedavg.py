"""FedAvg ("Vanilla"), McMahan et al., AISTATS 2017: the sample-weighted mean of the uploads."""

from __future__ import annotations

import torch

from fisherguard.defenses.base import (Combined, Defense, DefenseConfigError, RoundInput, Rows,
                                       valid_mask)


class FedAvg(Defense):
    """w^{t+1} = w^t + Σ_k α_k Δ_k with α_k = n_k / Σ_j n_j (FedAvg Eq. 1; FDCR Eq. 1)."""

    name = "fedavg"
    paper = "McMahan et al., AISTATS 2017"
    summary = "sample-count weighted mean of the client updates; no defense"
    suspicion_score = None  # no defense: weights are the claimed counts, nothing is judged

    def __init__(self, *, weights: str = "samples") -> None:
        if weights not in ("samples", "uniform"):
            raise DefenseConfigError(f"weights must be 'samples' or 'uniform', got {weights!r}")
        self.weights = weights

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        # summed in RoundInput order (not the rows' client-id order), as FedAvg always has
        ok = valid_mask(reasons)
        n = ri.num_samples.to(torch.float64) if self.weights == "samples" else torch.ones(ri.num_clients, dtype=torch.float64)
        alpha = torch.where(ok, n, torch.zeros_like(n))
        alpha = alpha / alpha.sum()
        step = (alpha[ok, None] * ri.updates[ok].to(torch.float64)).sum(0)
        return Combined(alpha, ri.global_weights + step.to(ri.global_weights.dtype))
