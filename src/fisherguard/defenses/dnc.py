"""Divide-and-Conquer (DnC), Shejwalkar, Houmansadr, NDSS 2021 (docs/baselines.md §3.6)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherguard.defenses._robust import (AssumedAttackers, check_bool, check_finite, check_seed,
                                          load_keys, make_generator, stable_order)
from fisherguard.defenses.base import (PRESETS, SUSPICION, Combined, Defense, RoundInput, Rows,
                                       check_choice, check_range)

Tensor = torch.Tensor


class DnC(AssumedAttackers, Defense):
    """On b random coordinates, score each centred update by its squared projection on the top
    singular vector and drop the ⌊c·f⌋ highest; output the mean of the raw kept updates
    (Shejwalkar & Houmansadr 2021, Alg. 2)."""

    name = "dnc"
    paper = "Shejwalkar, Houmansadr, NDSS 2021"
    summary = "removes the c*f updates with the largest projection on the top singular vector"
    suspicion_score = "outlier score (projection on the top singular vector)² (last iteration)"

    def __init__(self, *, b: int = 10_000, niters: int = 1, c: float = 1.0,
                 f: int | None = None, assumed_attackers: int = 0, on_violation: str = "cap",
                 weighted: bool = False, seed: int = 0, preset: str = "paper",
                 streams: str = "named") -> None:
        check_range("b", b, low=1, integer=True)
        check_range("niters", niters, low=1, integer=True)
        check_range("c", c, low=0.0)
        check_finite("c", c)
        check_bool("weighted", weighted)
        check_seed(seed)
        check_choice("preset", preset, PRESETS)
        self._init_attackers(f, assumed_attackers, on_violation)
        self.b, self.niters, self.c = int(b), int(niters), float(c)
        self.weighted, self.preset, self.seed, self.streams = weighted, preset, int(seed), streams
        self._gen = make_generator(seed, "dnc", streams)

    def _f_limit(self, k: int) -> tuple[int, str]:
        """Largest f with ⌊c·f⌋ ≤ K − 1, i.e. at least one client survives."""
        if self.c == 0.0:
            return max(self.f or 0, self.assumed_attackers), "floor(c*f) < K"
        f = int((k - 1) / self.c) + 1
        while f > 0 and math.floor(self.c * f) > k - 1:
            f -= 1
        return f, "floor(c*f) < K"

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k, n, p = ri.num_clients, rows.n, ri.num_params
        f, violated = self._resolve_f(k, *self._f_limit(k))
        removal = math.floor(self.c * f)
        keep = max(1, min(k - removal, n))  # rejected uploads count as already removed
        x = rows.deltas
        if self.preset == "code":
            # MarsFL scores and averages unit-normalised deltas (+1e-5), so |step| <= 1.
            x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
        good: set[int] = set(range(n)) if self.preset == "paper" else set()
        scores = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.niters):
            coords = torch.randperm(p, generator=self._gen)[:min(self.b, p)]
            sub = x[:, coords]
            centred = sub - sub.mean(0)
            top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            scores = (centred @ top) ** 2
            kept = set(stable_order(scores)[:keep])
            # The paper intersects the per-iteration good sets; MarsFL takes their union.
            good = good & kept if self.preset == "paper" else good | kept
        chosen = sorted(good)
        diag: dict[str, Any] = {"f": f, "assumption_violated": violated, "keep": keep,
                                "dnc_scores": rows.per_client(scores, k),
                                "kept": [rows.ids[i] for i in chosen], "preset": self.preset,
                                SUSPICION: rows.per_client(scores, k)}
        if not chosen:
            # Only possible with niters > 1: no client survived every iteration.
            return Combined.unchanged(ri, "all_removed", diagnostics=diag,
                                      zero_reason="outlier_score")
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = rows.counts[chosen] if self.weighted else 1.0
        w = w / w.sum()
        step = (w[:, None] * x).sum(0)
        return Combined(rows.scatter(w, k), ri.global_weights.to(torch.float64) + step, diag,
                        zero_reason="outlier_score")

    def draws_randomness(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["generator"], "DnC")
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])
