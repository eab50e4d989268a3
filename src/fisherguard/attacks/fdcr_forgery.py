"""FDCR discrepancy minimiser and cluster steering (docs/attacks.md §4.7 and
docs/attacks.md §4.8).

The attacker keeps its trained backdoor update Δ_k and chooses the importance I_k that FDCR's
min-max normalisation will read back from its Fisher, so that its masked update g̃_k = g_k ⊙ I_k
sits where the benign average is expected to be: per coordinate I_v = clip(τ_v / g_v, 0, 1), τ the
estimate of the benign average masked update. The uploaded Fisher is c₁·I with c₁ a power of two
near the attacker's honest Fisher maximum (c₀ = 0): min-max then returns I bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherguard.attacks.base import AttackConfigError, RoundView, check_state_keys, state_tensor
from fisherguard.attacks.forgery import Forgery, check_choice, clean_reference_fisher, minmax, \
    well_formed
from fisherguard.attacks.pgd import CleanReference
from fisherguard.clients.training import Upload

Tensor = torch.Tensor
ESTIMATES = ("prev_global", "clean_ref", "omniscient")


def importance_for(g: Tensor, tau: Tensor) -> Tensor:
    """I_v = clip(τ_v / g_v, 0, 1), 0 where g_v = 0; then I = 1 at the smallest |g_v| (its
    contribution ≈ 0) and, if no entry is 0, I = 0 at the next smallest, so that min-max of any
    c₁·I returns I itself (docs/attacks.md §4.7 step 4)."""
    g64, t64 = g.to(torch.float64), tau.to(torch.float64)
    safe = torch.where(g64 == 0, torch.ones_like(g64), g64)
    i = torch.where(g64 == 0, torch.zeros_like(g64), (t64 / safe).clamp(0.0, 1.0))
    order = torch.argsort(g64.abs(), stable=True)
    i[order[0]] = 1.0
    if i.numel() > 1 and bool((i > 0).all()):
        i[order[1]] = 0.0
    return i.to(g.dtype)


def raise_mean(importance: Tensor, g: Tensor, floor: float) -> Tensor:
    """The hardening-aware step (docs/attacks.md §4.7): I = 1 on the coordinates of smallest |g|
    (almost free for V) until mean(I) ≥ floor; min-max still returns I when one 0 is left."""
    i = importance.clone()
    if float(i.mean()) >= floor:
        return i
    order = torch.argsort(g.abs(), stable=True)
    zeros = order[i[order] < 1.0]
    need = math.ceil(floor * i.numel() - float(i.sum()))
    i[zeros[:max(0, min(need, zeros.numel() - 1))]] = 1.0
    return i


def fisher_for(importance: Tensor, honest: Tensor | None) -> Tensor:
    """F = c₁·I, c₁ = 2^round(log₂ max F_honest) (1 without one): benign magnitude, and exact
    under min-max because scaling by a power of two loses no bits."""
    top = float(honest.max()) if honest is not None else 0.0
    c1 = 2.0 ** round(math.log2(top)) if top > 0 and math.isfinite(top) else 1.0
    return importance * c1


class FDCRMinV(Forgery):
    """Choose I_k so g̃_k lands on the estimated benign average: the lowest V_k
    (docs/attacks.md §4.7)."""

    name = "fdcr-min-v"
    paper = "fisherguard threat analysis (docs/attacks.md §4.7)"
    summary = ("upload forgery (FDCR): Fisher whose importance minimises the discrepancy V_k "
               "(estimate prev_global | clean_ref | omniscient)")
    knowledge = "omniscient"  # the omniscient estimate; the instance keeps what it uses
    needs_view_fisher = True
    shared = False  # steering: every attacker uploads the same (Δ, F)

    def __init__(self, *, estimate: str = "prev_global",
                 min_mean: float | str | None = None) -> None:
        check_choice(self.name, "estimate", estimate, ESTIMATES)
        if not (min_mean is None or min_mean == "auto" or (
                isinstance(min_mean, (int, float)) and not isinstance(min_mean, bool)
                and 0 < min_mean < 1)):
            raise AttackConfigError(f"{self.name} option min_mean must be null, 'auto' or a "
                                    f"fraction in (0, 1), got {min_mean!r}")
        self.estimate, self.min_mean = estimate, min_mean
        self.knowledge = ("omniscient" if estimate == "omniscient"  # type: ignore[misc]
                          else "colluding" if self.shared else "model")
        self.reference = CleanReference(f"{self.name}-reference")
        self.prev: tuple[int, Tensor] | None = None  # (round, w^t) of the last round seen

    def eta(self) -> float:
        if self.ctx.plan is None:
            raise AttackConfigError(f"{self.name} needs the benign optimiser (its learning rate)")
        return float(self.ctx.plan.lr)

    def attacker_share(self, view: RoundView) -> float:
        """A: the attackers' total weight; equal sizes assumed unless omniscient."""
        if self.estimate != "omniscient":
            return len(self.ctx.attackers) / self.ctx.num_clients
        n_own = sum(float(u.num_samples) for u in view.own.values())
        n_all = n_own + sum(float(u.num_samples) for u in (view.benign or {}).values())
        return n_own / n_all if n_all > 0 else 0.0

    def target(self, view: RoundView, k: int) -> Tensor:
        """τ: the estimated benign average masked update (docs/attacks.md §4.7 step 2–3)."""
        g, eta = view.global_weights, self.eta()
        if self.estimate == "omniscient":
            uploads = {**view.own, **(view.benign or {})}
            n_all = sum(float(u.num_samples) for u in uploads.values())
            b = torch.zeros_like(g, dtype=torch.float64)
            for _, u in sorted((view.benign or {}).items()):
                if well_formed(u.weights, g) and well_formed(u.fisher, g):
                    b += (float(u.num_samples) / n_all) * ((u.weights - g) / eta
                                                           * minmax(u.fisher)).to(torch.float64)
            return (b / max(1e-12, 1.0 - self.attacker_share(view))).to(g.dtype)
        if view.benign is not None:  # the engine hands them to omniscient stages only
            raise RuntimeError(f"{self.name}: a non-omniscient stage was given the benign uploads")
        w_ref, f_ref = clean_reference_fisher(self, self.reference, view, k)
        if self.estimate == "prev_global" and self.prev is not None \
                and self.prev[0] == view.round_idx - 1:
            step = (g - self.prev[1]) / eta
        else:  # round 0, or the previous global model unseen: the clean reference update
            step = (w_ref - g) / eta
        return step * minmax(f_ref)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        if view.fisher is None:
            return super().after_training(view)
        g = view.global_weights
        own = {k: u for k, u in sorted(view.own.items()) if well_formed(u.weights, g)}
        if own:
            if self.shared:
                self.steer(view, own)
            else:
                for k, u in own.items():
                    self.forge(view, k, u)
        self.prev = (view.round_idx, g.detach().clone())
        return view.own

    def floor(self, honest: Tensor | None) -> float | None:
        """The mean importance to keep: ``auto`` = mean(minmax(own honest F)) / 10, ten times the
        FDCR spikiness threshold at its default ratio 100 if benign means are like its own."""
        if self.min_mean == "auto":
            return None if honest is None else float(minmax(honest).mean()) / 10
        return None if self.min_mean is None else float(self.min_mean)

    def crafted(self, grad: Tensor, tau: Tensor, honest: Tensor | None) -> Tensor:
        i = importance_for(grad, tau)
        floor = self.floor(honest)
        if floor is not None:
            i = raise_mean(i, grad, floor)
        return fisher_for(i, honest)

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        g = view.global_weights
        grad = (u.weights - g) / self.eta()
        u.fisher = self.crafted(grad, self.target(view, k), self.honest(view, k, u))

    def steer(self, view: RoundView, own: dict[int, Upload]) -> None:
        """Every attacker uploads w^t + mean Δ and one Fisher, from the lowest id's estimate."""
        g = view.global_weights
        first = min(own)
        delta = torch.stack([u.weights - g for u in own.values()]).mean(0)
        honest = self.honest(view, first, own[first])
        f = self.crafted(delta / self.eta(), self.target(view, first), honest)
        for u in own.values():
            u.weights, u.fisher = g + delta, f.clone()

    def state_dict(self) -> dict[str, Any]:
        if self.prev is None:
            return {}
        return {"round": self.prev[0], "weights": self.prev[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.prev = None
            return
        check_state_keys(self.name, state, ("round", "weights"))
        self.prev = (int(state["round"]), state_tensor(self.name, "weights", state["weights"]))


class FDCRSteer(FDCRMinV):
    """Colluders upload one identical minimiser (Δ, F), so FINCH groups them in one low-V
    cluster (docs/attacks.md §4.8)."""

    name = "fdcr-steer"
    paper = "fisherguard threat analysis (docs/attacks.md §4.8)"
    summary = "colluding upload forgery (FDCR): all attackers upload the same minimiser (delta, F)"
    shared = True
