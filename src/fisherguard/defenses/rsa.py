"""Byzantine-robust stochastic aggregation (RSA), Li, Xu, Chen, Giannakis, Ling, AAAI 2019
(docs/baselines.md §3.12)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherguard.clients.l1pull import L1Pull
from fisherguard.defenses._robust import check_finite, load_keys
from fisherguard.defenses.client_rows import ClientRows
from fisherguard.defenses.base import (ClientPlan, Combined, Defense, PlanInput, RoundInput, Rows,
                                       check_choice, check_range)

Tensor = torch.Tensor


class RSA(Defense):
    """Server step w ← w − α_t(λ·Σ_i sign(w − x_i) + μ·w), α_t = c/√(t+1); clients train with
    an L1 pull λ‖x_i − w‖₁ on persistent local models (Li et al. 2019, Eq. 7–8).

    Each client moves each coordinate by at most α_t·λ whatever it uploads, so
    ``client_weights`` is uniform over the valid clients (an equal vote, not a mixing weight).
    """

    name = "rsa"
    paper = "Li, Xu, Chen, Giannakis, Ling, AAAI 2019"
    summary = "server moves by the sign of each client's offset (L1 consensus); clients keep models"
    suspicion_score = None  # one equal sign vote per client: nothing per client
    client_regulariser = "l1pull"

    def __init__(self, *, lam: float = 0.07, mu: float = 0.01, c: float = 0.01,
                 client_init: str = "persistent") -> None:
        check_range("lam", lam, low=0.0)
        check_range("mu", mu, low=0.0)
        check_range("c", c, low=0.0, low_open=True)
        for name, v in (("lam", lam), ("mu", mu), ("c", c)):
            check_finite(name, v)
        check_choice("client_init", client_init, ("persistent", "global"))
        self.lam, self.mu, self.c = float(lam), float(mu), float(c)
        self.client_init = client_init
        self._local = ClientRows()  # each client's last model (persistent init)

    def step_size(self, round_idx: int) -> float:
        return self.c / math.sqrt(round_idx + 1)

    def plan_clients(self, plan_input: PlanInput) -> dict[int, ClientPlan]:
        """Every client adds λ‖x − w^t‖₁ and (persistent) resumes from its own last model."""
        reg = L1Pull(self.lam, plan_input.global_weights)
        plans = {}
        for cid in plan_input.client_ids:
            start = self._local.get(cid) if self.client_init == "persistent" else None
            if start is not None and start.shape != plan_input.global_weights.shape:
                start = None
            plans[cid] = ClientPlan(regulariser=reg,
                                    start_weights=None if start is None else start.clone())
        return plans

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        w = ri.global_weights.to(torch.float64)
        alpha_t = self.step_size(ri.round_idx)
        # sign(w − x_i) = −sign(Δ_i): the server moves towards the clients, one vote each.
        votes = torch.sign(rows.deltas).sum(0)
        step = alpha_t * (self.lam * votes - self.mu * w)
        if self.client_init == "persistent":
            for cid, d in zip(rows.ids, rows.deltas):
                self._local.set(cid, (w + d).to(ri.global_weights.dtype))
        weights = rows.scatter(torch.full((rows.n,), 1.0 / rows.n, dtype=torch.float64),
                               ri.num_clients)
        diag: dict[str, Any] = {"step_size": alpha_t,
                                "max_abs_step": float(step.abs().max()) if step.numel() else 0.0}
        return Combined(weights, w + step, diag)

    def state_dict(self) -> dict[str, Any]:
        return {"local_models": {cid: self._local.row(cid) for cid in self._local}}  # views, no copy

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["local_models"], "RSA")
        self._local = ClientRows()
        for c, x in state.get("local_models", {}).items():
            self._local.set(int(c), torch.as_tensor(x))
