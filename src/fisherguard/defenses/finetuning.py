"""Server-side fine-tuning of the FedAvg model on clean data (docs/baselines.md §3.15)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses.base import (Combined, Defense, RoundInput, Rows, check_choice,
                                       check_range)


class Finetuning(Defense):
    """w^{t+1} = E_ft epochs of the clients' SGD on U from FedAvg(w_k) (no method paper; both
    papers cite Quinn et al. 2019 for it, docs/baselines.md §3.15)."""

    name = "finetuning"
    paper = "no method paper (FDCR/SDFC cite Quinn et al., Dive into Deep Learning, 2019)"
    summary = "FedAvg, then a few epochs of SGD on the server's clean data"
    suspicion_score = None  # FedAvg weights, then server training: nothing per client
    needs_server_data = True

    def __init__(self, *, epochs: int = 20, weights: str = "samples") -> None:
        check_range("epochs", epochs, low=0, integer=True)
        check_choice("weights", weights, ("samples", "uniform"))
        self.epochs, self.weights = int(epochs), weights

    def requires_server_data(self) -> bool:
        """With 0 epochs the rule is FedAvg and never touches U."""
        return self.epochs > 0

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        alpha = rows.counts if self.weights == "samples" else torch.ones(rows.n,
                                                                          dtype=torch.float64)
        alpha = alpha / alpha.sum()
        w = ri.global_weights
        averaged = (w.to(torch.float64) + (alpha[:, None] * rows.deltas).sum(0)).to(w.dtype)
        diag: dict[str, Any] = {"epochs": self.epochs}
        status = "ok"
        new = averaged
        if self.epochs > 0:
            tuned = ri.server_data.train(averaged.clone(), self.epochs)
            if tuned.shape == averaged.shape and bool(torch.isfinite(tuned).all()):
                new = tuned.to(w.dtype)
                diag["finetune_shift"] = float((tuned.to(torch.float64)
                                                - averaged.to(torch.float64)).norm())
            else:
                status = "finetune_failed"  # keep the FedAvg model rather than a broken one
        return Combined(rows.scatter(alpha, ri.num_clients), new, diag, status=status)
