"""FLTrust, Cao, Fang, Liu, Gong, NDSS 2021 (docs/baselines.md §3.13)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses.base import SUSPICION, Combined, Defense, RoundInput, Rows, check_range


class FLTrust(Defense):
    """Trust score TS_k = ReLU(cos(Δ_k, g_0)) against a server update g_0 trained on clean
    data; updates are rescaled to ‖g_0‖ and averaged by TS (Cao et al. 2021, Alg. 1).

    ``client_weights`` are TS_k / Σ TS, the weights applied to the *rescaled* updates.
    """

    name = "fltrust"
    paper = "Cao, Fang, Liu, Gong, NDSS 2021"
    summary = "weights norm-matched updates by their cosine to an update trained on server data"
    needs_server_data = True
    # −cos orders clients as −TS does where TS > 0 and also ranks those ReLU clamps to TS = 0
    suspicion_score = "−cos(Δ_k, g_0), the negated cosine behind the trust TS = ReLU(cos)"
    reads_root_set = True

    def __init__(self, *, server_epochs: int = 20) -> None:
        check_range("server_epochs", server_epochs, low=1, integer=True)
        self.server_epochs = int(server_epochs)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k = ri.num_clients
        w = ri.global_weights
        trained = ri.server_data.train(w.clone(), self.server_epochs)
        g0 = trained.to(torch.float64) - w.to(torch.float64)
        g0_norm = float(g0.norm()) if bool(torch.isfinite(g0).all()) else 0.0
        norms = rows.deltas.norm(dim=1)
        usable = (norms > 0) & torch.isfinite(norms)
        cos = torch.zeros(rows.n, dtype=torch.float64)
        if g0_norm > 0:
            cos = torch.where(usable, (rows.deltas @ g0) / (norms.clamp_min(1e-300) * g0_norm),
                              cos)
        ts = cos.clamp_min(0.0)
        diag: dict[str, Any] = {"trust_scores": rows.per_client(ts, k),
                                "cosine": rows.per_client(cos, k), "server_update_norm": g0_norm,
                SUSPICION: rows.per_client(-cos, k)}
        total = float(ts.sum())
        if total <= 0.0:
            # No client agrees with the server's direction: keep w and flag the round.
            return Combined.unchanged(ri, "all_weights_zero", diagnostics=diag,
                                      zero_reason="low_trust")
        scale = torch.where(usable, g0_norm / norms.clamp_min(1e-300), torch.zeros_like(norms))
        step = ((ts * scale)[:, None] * rows.deltas).sum(0) / total
        return Combined(rows.scatter(ts / total, k), w.to(torch.float64) + step, diag,
                        zero_reason="low_trust")
