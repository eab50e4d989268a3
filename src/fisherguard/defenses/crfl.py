"""Certifiably robust FL (CRFL) training, Xie, Chen, Chen, Li, ICML 2021 (docs/baselines.md §3.16)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import check_finite, check_seed, load_keys, make_generator
from fisherguard.defenses.base import (PRESETS, Combined, Defense, RoundInput, Rows, check_choice,
                                       check_range)


class CRFL(Defense):
    """FedAvg, then clip the model parameters to norm ρ_t = min(a·t + b, ρ_max) and add
    N(0, σ²I) except in the last round (Xie et al. 2021, Alg. 1).

    ``eval_weights`` is the clipped pre-noise model (the original code evaluates it; preset
    ``code`` evaluates the noisy model as MarsFL does). ``client_weights`` are the FedAvg α_k.
    """

    name = "crfl"
    paper = "Xie, Chen, Chen, Li, ICML 2021"
    summary = "FedAvg, then clips the model's parameter norm and adds Gaussian noise"
    suspicion_score = None  # FedAvg weights, then clipping and noise: nothing per client

    def __init__(self, *, slope: float = 2.0, offset: float = 10.0, rho_max: float = 15.0,
                 sigma: float = 0.01, seed: int = 0, preset: str = "paper",
                 streams: str = "named") -> None:
        check_range("slope", slope, low=0.0)
        check_range("offset", offset, low=0.0, low_open=True)
        check_range("rho_max", rho_max, low=0.0, low_open=True)
        check_range("sigma", sigma, low=0.0)
        check_finite("sigma", sigma)
        check_finite("slope", slope)
        check_seed(seed)
        check_choice("preset", preset, PRESETS)
        self.slope, self.offset, self.rho_max = float(slope), float(offset), float(rho_max)
        self.sigma, self.seed, self.preset = float(sigma), int(seed), preset
        self.streams = streams
        self._gen = make_generator(seed, "crfl", streams)

    def clip_threshold(self, round_idx: int) -> float:
        return min(self.slope * round_idx + self.offset, self.rho_max)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        alpha = rows.counts / rows.counts.sum()
        model = ri.global_weights.to(torch.float64) + (alpha[:, None] * rows.deltas).sum(0)
        rho = self.clip_threshold(ri.round_idx)
        norm_before = float(model.norm())
        if norm_before > rho:
            # MarsFL divides by (‖w‖ + 1e-6); the paper's min(1, ρ/‖w‖) is exact.
            denom = norm_before + (1e-6 if self.preset == "code" else 0.0)
            model = model * (rho / denom)
        last = ri.num_rounds is not None and ri.round_idx >= ri.num_rounds - 1
        noisy = model
        noise_norm = 0.0
        if not last and self.sigma > 0:
            noise = torch.randn(model.shape, generator=self._gen, dtype=torch.float64) * self.sigma
            noisy = model + noise
            noise_norm = float(noise.norm())
        diag: dict[str, Any] = {"clip_threshold": rho, "norm_before_clip": norm_before,
                                "norm_after_clip": float(model.norm()),
                                "noise_added": noise_norm > 0, "noise_norm": noise_norm,
                                "preset": self.preset}
        return Combined(rows.scatter(alpha, ri.num_clients), noisy, diag,
                        eval_weights=(model.to(ri.global_weights.dtype) if self.preset == "paper"
                                      else None))

    def draws_randomness(self) -> bool:
        return self.sigma > 0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["generator"], "CRFL")
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])
