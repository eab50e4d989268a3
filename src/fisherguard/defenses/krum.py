"""Krum and Multi-Krum, Blanchard et al., NeurIPS 2017 (docs/baselines.md §3.2, docs/baselines.md §3.3)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import (AssumedAttackers, CodeMomentumState, ServerMomentum,
                                          check_bool, krum_select, marsfl_corrupted_count,
                                          pairwise_sq_dists)
from fisherguard.defenses.base import (PRESETS, SUSPICION, Combined, Defense, DefenseConfigError, RoundInput,
                                       Rows, check_choice, check_range)

Tensor = torch.Tensor


class _KrumBase(CodeMomentumState, AssumedAttackers, Defense):
    """Shared f handling, scoring and the `code` preset's momentum for Krum and Multi-Krum."""

    suspicion_score = "Krum score as is (summed distance to the nearest neighbours; lowest kept)"

    def _init_common(self, f: int | None, assumed_attackers: int, on_violation: str,
                     preset: str) -> None:
        self._init_attackers(f, assumed_attackers, on_violation)
        check_choice("preset", preset, PRESETS)
        self.preset = preset
        self._momentum = ServerMomentum(0.9)

    def _scores(self, ri: RoundInput, rows: Rows, count: int | None
                ) -> tuple[list[int], Tensor, dict[str, Any]]:
        """Selected rows (lowest scores first), scores and diagnostics for this round."""
        k = ri.num_clients
        if self.preset == "paper":
            f, violated = self._resolve_f(k, *self._f_limit(k))
            dist = pairwise_sq_dists(rows.deltas)
            neighbours = max(1, rows.n - f - 2)
        else:
            # MarsFL (C3): corrupted count 1, so every score sums the plain Euclidean distances
            # to all other clients.
            f, violated = marsfl_corrupted_count(rows.n), False
            dist = pairwise_sq_dists(rows.deltas).sqrt()
            neighbours = rows.n - 1
        neighbours = min(max(1, neighbours), max(1, rows.n - 1))
        m = self._count(k, rows.n, f) if count is None else count
        order, scores = krum_select(dist, f, rows.n, neighbours)
        diag = {"f": f, "assumption_violated": violated, "neighbours": neighbours,
                "krum_scores": rows.per_client(scores, k), "preset": self.preset,
                SUSPICION: rows.per_client(scores, k)}
        return order[:m], scores, diag

    def _f_limit(self, k: int) -> tuple[int, str] | None:
        return ((k - 3) // 2, "K >= 2f+3") if self.preset == "paper" else None

    def _count(self, k: int, n: int, f: int) -> int:
        return 1

    def _step(self, agg: Tensor) -> Tensor:
        return agg if self.preset == "paper" else self._momentum.step(agg)


class Krum(_KrumBase):
    """Output the update with the smallest sum of squared distances to its K−f−2 nearest
    neighbours (Blanchard et al. 2017, Def. 1)."""

    name = "krum"
    paper = "Blanchard et al., NeurIPS 2017"
    summary = "keeps the single update closest (squared L2) to its K-f-2 nearest neighbours"

    def __init__(self, *, f: int | None = None, assumed_attackers: int = 0,
                 on_violation: str = "cap", preset: str = "paper") -> None:
        self._init_common(f, assumed_attackers, on_violation, preset)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        chosen, _, diag = self._scores(ri, rows, 1)
        i = chosen[0]
        weights = rows.scatter(torch.nn.functional.one_hot(torch.tensor(i), rows.n).double(),
                               ri.num_clients)
        diag["selected"] = [rows.ids[i]]
        step = self._step(rows.deltas[i])
        return Combined(weights, ri.global_weights.to(torch.float64) + step, diag,
                        zero_reason="not_selected")


class MultiKrum(_KrumBase):
    """Average the m updates with the lowest Krum scores (Blanchard et al. 2017, §4
    "Multi-Krum")."""

    name = "multi-krum"
    paper = "Blanchard et al., NeurIPS 2017"
    summary = "mean of the m updates with the lowest Krum scores (default m = K - f, unweighted)"

    def __init__(self, *, m: int | None = None, weighted: bool = False, f: int | None = None,
                 assumed_attackers: int = 0, on_violation: str = "cap",
                 preset: str = "paper") -> None:
        check_range("m", m, low=1, integer=True, allow_none=True)
        check_bool("weighted", weighted)
        self._init_common(f, assumed_attackers, on_violation, preset)
        self.m = None if m is None else int(m)
        self.weighted = weighted

    def check_clients(self, num_clients: int) -> None:
        super().check_clients(num_clients)
        if self.m is not None and self.m > num_clients:
            raise DefenseConfigError(f"m={self.m} must be <= K={num_clients} (the number of "
                                     "clients)")

    def _count(self, k: int, n: int, f: int) -> int:
        if self.m is not None:
            self.check_clients(k)
            return min(self.m, n)
        # MarsFL keeps a hard-coded 5 (docs/baselines.md §3.3); the paper default is m = K − f.
        m = 5 if self.preset == "code" else k - f
        return max(1, min(m, n))

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        chosen, _, diag = self._scores(ri, rows, None)
        sel = torch.zeros(rows.n, dtype=torch.float64)
        sel[chosen] = rows.counts[chosen] if self.weighted else 1.0
        sel = sel / sel.sum()
        diag["selected"] = sorted(rows.ids[i] for i in chosen)
        diag["m"] = len(chosen)
        step = self._step((sel[:, None] * rows.deltas).sum(0))
        return Combined(rows.scatter(sel, ri.num_clients),
                        ri.global_weights.to(torch.float64) + step, diag, zero_reason="not_selected")
