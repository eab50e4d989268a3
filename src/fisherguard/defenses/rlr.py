"""Robust learning rate (RLR), Ozdayi, Kantarcioglu, Gel, AAAI 2021 (docs/baselines.md §3.5)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import check_finite, check_seed, load_keys, make_generator
from fisherguard.defenses.base import (PRESETS, Combined, Defense, RoundInput, Rows, check_choice,
                                       check_range)


class RLR(Defense):
    """Per coordinate, the server learning rate is +η_s when |Σ_k sign(Δ_k)| ≥ θ and −η_s
    otherwise, applied to the FedAvg step (Ozdayi et al. 2021, Eq. 3–4)."""

    name = "rlr"
    paper = "Ozdayi, Kantarcioglu, Gel, AAAI 2021"
    summary = "flips the server learning rate on coordinates where fewer than theta signs agree"
    # a sign vote per coordinate sets the learning rate there; every client keeps its α_k
    suspicion_score = None

    def __init__(self, *, theta: float | None = None, server_lr: float = 1.0,
                 preset: str = "paper", seed: int = 0,
                 streams: str = "named") -> None:
        check_range("theta", theta, low=0.0, allow_none=True)
        check_range("server_lr", server_lr, low=0.0, low_open=True)
        check_finite("server_lr", server_lr)
        check_choice("preset", preset, PRESETS)
        check_seed(seed)
        self.preset = preset
        # θ = 4 (paper scripts, MarsFL); the SDFC config's 0.5 only flips coordinates with s_v = 0.
        self.theta = float(theta) if theta is not None else (4.0 if preset == "paper" else 0.5)
        self.server_lr = float(server_lr)
        self.seed = int(seed)
        self.streams = streams
        self._gen = make_generator(seed, "rlr", streams)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        alpha = rows.counts / rows.counts.sum()
        if self.preset == "code":
            # MarsFL (C4): sample-count weights are read in a shuffled list order while deltas
            # stay in client order, so client i gets the weight of client perm[i].
            alpha = alpha[torch.randperm(rows.n, generator=self._gen)]
        agreement = torch.sign(rows.deltas).sum(0).abs()
        lr = torch.where(agreement >= self.theta, self.server_lr, -self.server_lr).to(torch.float64)
        step = lr * (alpha[:, None] * rows.deltas).sum(0)
        weights = rows.scatter(alpha, ri.num_clients)
        diag: dict[str, Any] = {"theta": self.theta,
                                "flipped_fraction": float((lr < 0).double().mean())
                                if lr.numel() else 0.0, "preset": self.preset}
        return Combined(weights, ri.global_weights.to(torch.float64) + step, diag)

    def draws_randomness(self) -> bool:
        return self.preset == "code"

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()} if self.preset == "code" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["generator"] if self.preset == "code" else [], "RLR")
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])
