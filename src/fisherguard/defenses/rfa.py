"""Robust federated aggregation (RFA, geometric median), Pillutla, Kakade, Harchaoui,
IEEE TSP 2022 (docs/baselines.md §3.11)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import check_finite
from fisherguard.defenses.base import (SUSPICION, Combined, Defense, RoundInput, Rows,
                                       check_choice, check_range)

Tensor = torch.Tensor


def _distances(x: Tensor, z: Tensor) -> Tensor:
    """‖x_k − z‖ per row; rows whose plain norm overflows (|x| ~ 1e300: the squares are inf,
    found by fuzzing) are measured as max|·| × ‖·/max|·|‖, so normal inputs keep their bits."""
    d = x - z
    dist = d.norm(dim=1)
    over = ~torch.isfinite(dist)
    if bool(over.any()):
        scale = d[over].abs().amax(dim=1)
        dist[over] = scale * (d[over] / scale[:, None]).norm(dim=1)
    return dist


def _objective(z: Tensor, x: Tensor, alpha: Tensor) -> float:
    return float((alpha * _distances(x, z)).sum())


class RFA(Defense):
    """Smoothed Weiszfeld iterations towards the α-weighted geometric median of the updates
    (Pillutla et al. 2022, Alg. 3).

    ``client_weights`` are the normalised Weiszfeld weights β_k of the last step, so the new
    model is exactly w + Σ_k weight_k Δ_k.
    """

    name = "rfa"
    paper = "Pillutla, Kakade, Harchaoui, IEEE TSP 2022"
    summary = "geometric median of the updates by smoothed Weiszfeld iterations"
    # the Weiszfeld weight β_k ∝ α_k / max(‖Δ_k − z‖, ν) falls as this distance grows
    suspicion_score = "distance ‖Δ_k − z‖ to the returned geometric-median estimate z"

    def __init__(self, *, nu: float = 1e-5, max_iter: int = 3, ftol: float = 1e-6,
                 weights: str = "samples") -> None:
        check_range("nu", nu, low=0.0, low_open=True)
        check_range("max_iter", max_iter, low=0, integer=True)
        check_range("ftol", ftol, low=0.0)
        check_finite("nu", nu)
        check_finite("ftol", ftol)
        check_choice("weights", weights, ("samples", "uniform"))
        self.nu, self.max_iter, self.ftol, self.weights = float(nu), int(max_iter), float(ftol), \
            weights

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        x = rows.deltas
        alpha = rows.counts if self.weights == "samples" else torch.ones(rows.n,
                                                                          dtype=torch.float64)
        alpha = alpha / alpha.sum()
        beta = alpha.clone()
        z = (alpha[:, None] * x).sum(0)
        objective = [_objective(z, x, alpha)]
        for _ in range(self.max_iter):
            dist = _distances(x, z)
            step = alpha / dist.clamp_min(self.nu)
            if not (bool(torch.isfinite(step).all()) and float(step.sum()) > 0):
                break  # distances beyond float64's range: keep the last finite step
            beta = step / step.sum()
            z = (beta[:, None] * x).sum(0)
            objective.append(_objective(z, x, alpha))
            if abs(objective[-2] - objective[-1]) < self.ftol * objective[-1]:
                break
        weights = rows.scatter(beta, ri.num_clients)
        diag: dict[str, Any] = {"objective": objective, "iterations": len(objective) - 1,
                                "weiszfeld_weights": rows.per_client(beta, ri.num_clients),
                                SUSPICION: rows.per_client((x - z).norm(dim=1), ri.num_clients)}
        return Combined(weights, ri.global_weights.to(torch.float64) + z, diag)
