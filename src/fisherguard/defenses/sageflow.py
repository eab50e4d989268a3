"""Sageflow, Park, Han, Choi, Moon, NeurIPS 2021 (docs/baselines.md §3.14)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherguard.defenses._robust import check_bool, check_finite
from fisherguard.defenses.base import (PRESETS, SUSPICION, Combined, Defense, RoundInput, Rows,
                                       check_choice, check_range)


class Sageflow(Defense):
    """Entropy filter (E_k < E_th) and loss-weighted averaging β_k ∝ 1/ℓ_k^δ of the uploaded
    models on the server's clean data (Park et al. 2021, Eq. 5–6; synchronous case).

    Preset ``code`` reproduces MarsFL, which evaluates the *global* model for every client, so
    all clients get equal weight (docs/baselines.md §3.14).
    """

    name = "sageflow"
    paper = "Park, Han, Choi, Moon, NeurIPS 2021"
    summary = "drops high-entropy models and weights the rest by 1/loss^delta on server data"
    needs_server_data = True
    # the weight β_k ∝ ℓ_k^(−δ) falls as the loss grows; a client the entropy filter (or a
    # non-finite loss) removed is not scored: metrics rank such removed clients first
    suspicion_score = "loss ℓ_k on U of the uploaded model (clients past the entropy filter)"
    reads_root_set = True

    def __init__(self, *, entropy_threshold: float = 2.2, delta: float = 5.0,
                 use_sample_counts: bool = False, preset: str = "paper") -> None:
        check_range("entropy_threshold", entropy_threshold, low=0.0, low_open=True)
        check_range("delta", delta, low=0.0)
        check_finite("delta", delta)
        check_bool("use_sample_counts", use_sample_counts)
        check_choice("preset", preset, PRESETS)
        self.entropy_threshold, self.delta = float(entropy_threshold), float(delta)
        self.use_sample_counts, self.preset = use_sample_counts, preset

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        k = ri.num_clients
        w = ri.global_weights
        if self.preset == "code":
            loss_g, ent_g = ri.server_data.loss_and_entropy(w.clone())
            stats = [(float(loss_g), float(ent_g))] * rows.n
        else:
            stats = [tuple(map(float, ri.server_data.loss_and_entropy(
                (w.to(torch.float64) + d).to(w.dtype)))) for d in rows.deltas]
        loss = torch.tensor([s[0] for s in stats], dtype=torch.float64)
        ent = torch.tensor([s[1] for s in stats], dtype=torch.float64)
        finite = torch.isfinite(loss) & torch.isfinite(ent)
        passed = finite & (ent < self.entropy_threshold)
        # A loss of exactly 0 would give an infinite weight; floor it.
        raw = torch.where(passed, loss.clamp_min(1e-12).pow(-self.delta), torch.zeros_like(loss))
        if self.use_sample_counts:
            raw = raw * rows.counts
        diag: dict[str, Any] = {"entropy": rows.per_client(torch.nan_to_num(ent, nan=-1.0), k),
                                "loss": rows.per_client(torch.nan_to_num(loss, nan=-1.0), k),
                                "preset": self.preset, SUSPICION: rows.per_client(loss, k)}
        for i, pos in enumerate(rows.index.tolist()):
            if not bool(finite[i]):
                reasons[pos] = "non_finite_loss"
            elif not bool(passed[i]):
                reasons[pos] = "high_entropy"
            if not bool(passed[i]):
                diag[SUSPICION][pos] = None
        total = float(raw.sum())
        if not (total > 0.0 and math.isfinite(total)):
            return Combined.unchanged(ri, "all_weights_zero", diagnostics=diag)
        beta = raw / total
        step = (beta[:, None] * rows.deltas).sum(0)
        return Combined(rows.scatter(beta, k), w.to(torch.float64) + step, diag)
