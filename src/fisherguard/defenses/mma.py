"""Multi-Metrics aggregation (MMA), Huang, Li, Chen, Shi, Gao, ICCV 2023 (docs/baselines.md §3.7)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherguard.defenses._robust import stable_order
from fisherguard.defenses.base import (SUSPICION, Combined, Defense, RoundInput, Rows, check_choice,
                                       check_range)

Tensor = torch.Tensor


def multi_metric_features(x: Tensor) -> Tensor:
    """t_i = (Σ_j (1 − cos)², Σ_j ‖x_i − x_j‖₁, Σ_j |‖x_i‖₂ − ‖x_j‖₂|) over j ≠ i, (n, 3).

    The third metric is the norm difference of the official code, not the paper's Euclidean
    distance (docs/baselines.md §3.7).
    """
    n = x.shape[0]
    norms = x.norm(dim=1)
    unit = torch.where(norms[:, None] > 0, x / norms[:, None].clamp_min(1e-300),
                       torch.zeros_like(x))
    cos_term = ((1.0 - unit @ unit.T) ** 2).fill_diagonal_(0.0).sum(1)
    l1 = torch.stack([(x[i] - x).abs().sum(1) for i in range(n)]).fill_diagonal_(0.0).sum(1)
    norm_term = (norms[:, None] - norms[None, :]).abs().sum(1)
    return torch.stack([cos_term, l1, norm_term], dim=1)


def mahalanobis_scores(t: Tensor) -> tuple[Tensor, bool]:
    """score_i = t_i Σ⁻¹ t_iᵀ with Σ the sample covariance of the (uncentred) t_i; a singular Σ
    falls back to the pseudo-inverse and is reported (the official code would fail)."""
    cov = torch.cov(t.T)
    # svdvals raises on a non-finite matrix: such a Σ is treated as singular without it
    singular = not bool(torch.isfinite(cov).all())
    if not singular:
        sv = torch.linalg.svdvals(cov)
        singular = bool(sv.min() <= sv.max() * cov.shape[0] * torch.finfo(torch.float64).eps)
    if singular:
        inv = torch.linalg.pinv(torch.nan_to_num(cov))
    else:
        inv = torch.linalg.inv(cov)
    return ((t @ inv) * t).sum(1), singular


class MMA(Defense):
    """Score each client by the Mahalanobis-type norm of its summed cosine, Manhattan and
    norm-difference distances to the others; keep the ⌊p·K⌋ lowest (Huang et al. 2023, §4)."""

    name = "mma"
    paper = "Huang, Li, Chen, Shi, Gao, ICCV 2023"
    summary = "keeps the p*K clients with the lowest multi-metric (cosine, L1, norm) score"
    suspicion_score = "multi-metric Mahalanobis score as is (lowest p·K kept)"

    def __init__(self, *, p: float = 0.3, vectors: str = "weights") -> None:
        check_range("p", p, low=0.0, low_open=True, high=1.0)
        check_choice("vectors", vectors, ("weights", "deltas"))
        self.p, self.vectors = float(p), vectors

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k, n = ri.num_clients, rows.n
        x = rows.deltas
        if self.vectors == "weights":
            x = x + ri.global_weights.to(torch.float64)
        # The 1e-9 keeps ⌊0.3·10⌋ = 3 against products such as 0.29·100 = 28.999…
        keep = max(1, min(n, math.floor(self.p * n + 1e-9)))
        singular = False
        if n >= 2:
            t = multi_metric_features(x)
            if not bool(torch.isfinite(t).all()):
                # finite but huge uploads (|x| ~ 1e300) overflow the norms and sums; the
                # features of x / max|x| give the same scores (cosine is scale-free, the L1 and
                # norm columns scale by one constant that the Mahalanobis form cancels)
                t = multi_metric_features(x / x.abs().max())
            scores, singular = mahalanobis_scores(t)
        else:
            scores = torch.zeros(n, dtype=torch.float64)
        chosen = stable_order(scores)[:keep]
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = rows.counts[chosen]
        w = w / w.sum()
        step = (w[:, None] * rows.deltas).sum(0)
        diag: dict[str, Any] = {"mma_scores": rows.per_client(scores, k), "keep": keep,
                                "singular_covariance": singular,
                                SUSPICION: rows.per_client(scores, k)}
        return Combined(rows.scatter(w, k), ri.global_weights.to(torch.float64) + step, diag,
                        zero_reason="high_score",
                        status="singular_covariance" if singular else "ok")
