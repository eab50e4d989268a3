"""Coordinate-wise median, Yin, Chen, Ramchandran, Bartlett, ICML 2018 (docs/baselines.md §3.8)."""

from __future__ import annotations

import torch

from fisherguard.defenses._robust import coordinate_median, share_to_weights
from fisherguard.defenses.base import Combined, Defense, RoundInput, Rows


class Median(Defense):
    """w ← w + median_k Δ_k per coordinate, unweighted; for even K the mean of the two middle
    values (Yin et al. 2018, Def. 1).

    ``client_weights`` is each client's mean share of the output coordinates (1 where its value
    is the median, 1/2 where it is one of the two middle values), so it sums to 1 and is 0 only
    for a client that is never at the centre of any coordinate.
    """

    name = "median"
    paper = "Yin, Chen, Ramchandran, Bartlett, ICML 2018"
    summary = "coordinate-wise median of the updates (unweighted)"
    # coordinate-wise: it judges values per coordinate, never a client (``contribution`` is a
    # by-product of the median, not a score it ranks clients by)
    suspicion_score = None

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        med, share = coordinate_median(rows.deltas)
        weights = rows.scatter(share_to_weights(share), ri.num_clients)
        return Combined(weights, ri.global_weights.to(torch.float64) + med,
                        {"contribution": rows.per_client(share_to_weights(share), ri.num_clients)},
                        zero_reason="trimmed")
