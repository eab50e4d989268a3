"""FoolsGold, Fung, Yoon, Beschastnikh, arXiv 1808.04866 / RAID 2020 (docs/baselines.md §3.4)."""

from __future__ import annotations

from typing import Any

import torch

from fisherguard.defenses._robust import check_finite, check_seed, load_keys, make_generator
from fisherguard.defenses.client_rows import ClientRows
from fisherguard.defenses.base import (PRESETS, SUSPICION, Combined, Defense, RoundInput, Rows,
                                       check_choice, check_range)

Tensor = torch.Tensor


def foolsgold_weights(history: Tensor, kappa: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row FoolsGold weight a_i ∈ [0, 1] and max similarity v_i (Fung et al., Alg. 1).

    As in the original code the diagonal of the cosine matrix is set to 0 rather than removed,
    so v_i = max(0, max_{j≠i} cs_ij): with a negative v_i the pardoning ratio v_i/v_j would flip
    the sign of a negative similarity.
    """
    n = history.shape[0]
    norms = history.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, history / norms.clamp_min(1e-300), torch.zeros_like(history))
    cs = unit @ unit.T
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values + eps
    # Pardoning: an honest client similar to a sybil is scaled down by v_i / v_j.
    ratio = v[:, None] / v[None, :]
    pardon = (v[:, None] < v[None, :]) & ~torch.eye(n, dtype=torch.bool)
    cs = torch.where(pardon, cs * ratio, cs)
    a = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    # Identical histories give cos = 1 only up to rounding; without this guard a ≈ 1e-16 would
    # be rescaled to the maximum weight below when every client is a sybil.
    a = torch.where(a < 1e-12, torch.zeros_like(a), a)
    top = float(a.max()) if n else 0.0
    if top <= 0.0:
        return torch.zeros(n, dtype=torch.float64), v - eps
    a = a / top
    a = torch.where(a == 1.0, torch.full_like(a, 0.99), a)
    a = kappa * (torch.log(a / (1.0 - a) + eps) + 0.5)
    a = torch.where(torch.isinf(a) | (a > 1.0), torch.ones_like(a), a)
    a = torch.where(torch.isnan(a) | (a < 0.0), torch.zeros_like(a), a)
    return a, v - eps


class FoolsGold(Defense):
    """Down-weight clients whose accumulated updates are mutually similar (sybils), using
    cosine similarity of per-client update histories (Fung et al. 2018, Alg. 1)."""

    name = "foolsgold"
    paper = "Fung, Yoon, Beschastnikh, arXiv 1808.04866 (RAID 2020)"
    summary = "down-weights clients whose update histories are too similar (sybil detection)"
    suspicion_score = "−a_k, the negated FoolsGold weight (a ∈ [0, 1]; sybils get low a)"

    def __init__(self, *, kappa: float = 1.0, epsilon: float = 1e-5,
                 clip_norm: float | None = 1.0, preset: str = "paper", seed: int = 0,
                 streams: str = "named") -> None:
        check_range("kappa", kappa, low=0.0, low_open=True)
        check_range("epsilon", epsilon, low=0.0)
        check_range("clip_norm", clip_norm, low=0.0, low_open=True, allow_none=True)
        check_finite("kappa", kappa)
        check_finite("epsilon", epsilon)
        check_choice("preset", preset, PRESETS)
        check_seed(seed)
        self.kappa, self.epsilon = float(kappa), float(epsilon)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.preset = preset
        self.seed = int(seed)
        # paper: history keyed by client id. code: MarsFL's positional rows (defect C4).
        self._history = ClientRows()  # Σ of each client's deltas, float64
        self._positional: Tensor | None = None
        self.streams = streams
        self._gen = make_generator(seed, "foolsgold", streams)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        if self.preset == "code":
            return self._combine_code(ri, rows)

        deltas = rows.deltas
        if self.clip_norm is not None:
            norms = deltas.norm(dim=1, keepdim=True)
            deltas = deltas * torch.clamp(self.clip_norm / norms.clamp_min(1e-300), max=1.0)
        hist = []
        for cid, d in zip(rows.ids, deltas):
            prev = self._history.get(cid)
            if prev is not None and prev.shape != d.shape:
                raise ValueError(f"FoolsGold history of client {cid} has {prev.numel()} "
                                 f"parameters, the round has {d.numel()}")
            if prev is None:
                self._history.set(cid, d.to(torch.float64))
            else:
                prev += d
            hist.append(self._history.row(cid))
        a, v = foolsgold_weights(torch.stack(hist), self.kappa, self.epsilon)
        return self._combined(ri, rows, a, v, deltas, normalise=True)

    def _combine_code(self, ri: RoundInput, rows: Rows) -> Combined:
        """MarsFL: unit-normalised deltas, positional history in a seeded shuffled order, the
        similarity on the first K coordinates only, and an unnormalised weighted sum."""
        n, p = rows.n, ri.num_params
        perm = torch.randperm(n, generator=self._gen)
        unit = rows.deltas / (rows.deltas.norm(dim=1, keepdim=True) + 1e-5)
        shuffled = unit[perm]
        if self._positional is None or self._positional.shape[1] != p:
            self._positional = torch.zeros(0, p, dtype=torch.float64)
        if self._positional.shape[0] < n:
            pad = torch.zeros(n - self._positional.shape[0], p, dtype=torch.float64)
            self._positional = torch.cat([self._positional, pad])
        self._positional[:n] += shuffled
        features = self._positional[:n, :min(ri.num_clients, p)]
        a_pos, v_pos = foolsgold_weights(features, self.kappa, self.epsilon)
        a = torch.empty(n, dtype=torch.float64)
        v = torch.empty(n, dtype=torch.float64)
        a[perm], v[perm] = a_pos, v_pos
        return self._combined(ri, rows, a, v, unit, normalise=False)

    def _combined(self, ri: RoundInput, rows: Rows, a: Tensor, v: Tensor, deltas: Tensor,
                  normalise: bool) -> Combined:
        k = ri.num_clients
        diag: dict[str, Any] = {"foolsgold_weights": rows.per_client(a, k),
                                "max_similarity": rows.per_client(v, k), "preset": self.preset,
                SUSPICION: rows.per_client(-a, k)}
        total = float(a.sum())
        if total <= 0.0:
            # Every client looks like a sybil: leave the model unchanged and flag the round.
            return Combined.unchanged(ri, "all_weights_zero", diagnostics=diag,
                                      zero_reason="sybil_similarity")
        step = (a[:, None] * deltas).sum(0)
        if normalise:
            step = step / total
        return Combined(rows.scatter(a / total, k), ri.global_weights.to(torch.float64) + step,
                        diag, zero_reason="sybil_similarity")

    def draws_randomness(self) -> bool:
        return self.preset == "code"

    def state_dict(self) -> dict[str, Any]:
        return {"history": {cid: self._history.row(cid) for cid in self._history},  # views, no copy
                "positional": None if self._positional is None else self._positional.clone(),
                "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["history", "positional", "generator"], "FoolsGold")
        self._history = ClientRows()
        for c, h in state.get("history", {}).items():
            self._history.set(int(c), torch.as_tensor(h, dtype=torch.float64))
        pos = state.get("positional")
        self._positional = None if pos is None else torch.as_tensor(pos, dtype=torch.float64)
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])
