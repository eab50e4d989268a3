"""Bulyan, El Mhamdi, Guerraoui, Rouault, ICML 2018 (docs/baselines.md §3.10)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import (AssumedAttackers, CodeMomentumState, ServerMomentum,
                                          closest_to_centre_mean, coordinate_median, krum_scores,
                                          marsfl_corrupted_count, pairwise_sq_dists,
                                          share_to_weights, stable_order)
from fisherguard.defenses.base import (PRESETS, SUSPICION, Combined, Defense, RoundInput, Rows,
                                       check_choice)

Tensor = torch.Tensor


class Bulyan(CodeMomentumState, AssumedAttackers, Defense):
    """Iterated Krum selects θ = K−2f updates; per coordinate, average the β = θ−2f values
    closest to their median (El Mhamdi et al. 2018, Alg. 1).

    ``client_weights`` is each client's mean share of the output coordinates (0 for a client
    outside the selection set or never among the β closest), so it sums to 1.
    """

    name = "bulyan"
    paper = "El Mhamdi, Guerraoui, Rouault, ICML 2018"
    summary = "iterated Krum picks K-2f updates, then a median-centred coordinate-wise mean"
    suspicion_score = "first Krum score as is (over all valid clients, before iterated selection)"

    def __init__(self, *, f: int | None = None, assumed_attackers: int = 0,
                 on_violation: str = "cap", preset: str = "paper") -> None:
        self._init_attackers(f, assumed_attackers, on_violation)
        check_choice("preset", preset, PRESETS)
        self.preset = preset
        self._momentum = ServerMomentum(0.9)

    def _f_limit(self, k: int) -> tuple[int, str] | None:
        return ((k - 3) // 4, "K >= 4f+3") if self.preset == "paper" else None

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k, n = ri.num_clients, rows.n
        if self.preset == "paper":
            f, violated = self._resolve_f(k, *self._f_limit(k))
            # Rejected uploads shrink the round below K: keep the precondition for what is left.
            f_round = min(f, max(0, (n - 3) // 4))
            dist = pairwise_sq_dists(rows.deltas)
        else:
            # MarsFL (C3): corrupted count 1 (0 for odd K), plain Euclidean distances, every
            # Krum score sums over all remaining clients.
            f, violated = marsfl_corrupted_count(n), False
            f_round = min(f, max(0, (n - 3) // 4))
            dist = pairwise_sq_dists(rows.deltas).sqrt()
        theta = n - 2 * f_round
        # MarsFL averages θ − 2f − 1 values around the median instead of β = θ − 2f.
        beta = max(1, theta - 2 * f_round - (1 if self.preset == "code" else 0))

        remaining = list(range(n))
        selected: list[int] = []
        first_scores: Tensor | None = None
        for _ in range(theta):
            sub = dist[remaining][:, remaining]
            neighbours = (max(1, len(remaining) - f_round - 2) if self.preset == "paper"
                          else len(remaining) - 1)
            scores = krum_scores(sub, f_round, max(1, neighbours))
            if first_scores is None:
                first_scores = scores
            win = remaining[stable_order(scores)[0]]
            selected.append(win)
            remaining.remove(win)

        sel_rows = sorted(selected)  # client-id order keeps tie-breaking deterministic
        x = rows.deltas[sel_rows]
        centre, _ = coordinate_median(x)
        agg, used = closest_to_centre_mean(x, centre, beta)
        share = torch.zeros(n, dtype=torch.float64)
        share[sel_rows] = share_to_weights(used / beta)
        weights = rows.scatter(share, k)
        in_set = set(sel_rows)
        for i, pos in enumerate(rows.index.tolist()):
            if i not in in_set:
                reasons[pos] = "not_selected"  # the others at weight 0 are "trimmed"
        step = agg if self.preset == "paper" else self._momentum.step(agg)
        diag: dict[str, Any] = {
            "f": f, "f_round": f_round, "assumption_violated": violated, "theta": theta,
            "beta": beta, "selected": sorted(rows.ids[i] for i in sel_rows),
            "selection_order": [rows.ids[i] for i in selected],
            "krum_scores": rows.per_client(first_scores, k), "preset": self.preset,
            SUSPICION: rows.per_client(first_scores, k)}
        return Combined(weights, ri.global_weights.to(torch.float64) + step, diag,
                        zero_reason="trimmed")

