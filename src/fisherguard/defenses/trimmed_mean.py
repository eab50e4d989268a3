"""Coordinate-wise trimmed mean ("Trim Median"), Yin et al., ICML 2018 (docs/baselines.md §3.9)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import (AssumedAttackers, CodeMomentumState, ServerMomentum,
                                          closest_to_centre_mean, coordinate_median,
                                          share_to_weights, trimmed_mean)
from fisherguard.defenses.base import (PRESETS, Combined, Defense, DefenseConfigError, RoundInput,
                                       Rows, check_choice, check_range)


class TrimmedMean(CodeMomentumState, AssumedAttackers, Defense):
    """Per coordinate drop the ⌊βK⌋ smallest and largest values and average the rest
    (Yin et al. 2018, Def. 2); default ⌊βK⌋ = f.

    ``client_weights`` is each client's mean share of the output coordinates, so it sums to 1
    and is 0 only for a client trimmed in every coordinate. Preset ``code`` is MarsFL's
    median-centred mean of the ⌊K/2⌋ values nearest the median plus server momentum 0.9.
    """

    name = "trimmed-mean"
    paper = "Yin, Chen, Ramchandran, Bartlett, ICML 2018"
    summary = "coordinate-wise mean after dropping the f (or beta*K) largest and smallest values"
    # coordinate-wise: it trims values per coordinate, never a client (``contribution`` is a
    # by-product of the trimming, not a score it ranks clients by)
    suspicion_score = None

    def __init__(self, *, beta: float | None = None, f: int | None = None,
                 assumed_attackers: int = 0, on_violation: str = "cap",
                 preset: str = "paper") -> None:
        # β is a fraction per tail as in scipy/Flower; 0.5 would trim everything.
        check_range("beta", beta, low=0.0, high=0.5, allow_none=True)
        if beta is not None and beta == 0.5:
            raise DefenseConfigError("beta must be a number >= 0.0 and < 0.5, got 0.5")
        self._init_attackers(f, assumed_attackers, on_violation)
        check_choice("preset", preset, PRESETS)
        self.beta = None if beta is None else float(beta)
        self.preset = preset
        self._momentum = ServerMomentum(0.9)

    def _f_limit(self, k: int) -> tuple[int, str] | None:
        if self.preset == "code" or self.beta is not None:
            return None
        return (k - 1) // 2, "2f < K"

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k, n = ri.num_clients, rows.n
        diag: dict[str, Any] = {"preset": self.preset}
        if self.preset == "code":
            centre, _ = coordinate_median(rows.deltas)
            agg, used = closest_to_centre_mean(rows.deltas, centre, n // 2)
            share = used / used.sum(0, keepdim=True)
            diag["kept_per_coordinate"] = max(1, n // 2)
            step = self._momentum.step(agg)
        else:
            if self.beta is not None:
                cut = int(self.beta * n)  # scipy's and Flower's int(proportiontocut * n)
            else:
                f, violated = self._resolve_f(k, *self._f_limit(k))
                diag.update(f=f, assumption_violated=violated)
                cut = f
            cut = min(cut, (n - 1) // 2)  # rejected uploads may leave fewer than K values
            agg, kept = trimmed_mean(rows.deltas, cut)
            share = kept / (n - 2 * cut)
            diag.update(cut_per_tail=cut, kept_per_coordinate=n - 2 * cut)
            step = agg
        contribution = share_to_weights(share)
        diag["contribution"] = rows.per_client(contribution, k)
        return Combined(rows.scatter(contribution, k), ri.global_weights.to(torch.float64) + step,
                        diag, zero_reason="trimmed")

