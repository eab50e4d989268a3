"""3DFed (Li et al., IEEE S&P 2023), partial: constrained loss, noise mask, indicators (docs/attacks.md §3.10).

Implemented: (1) backdoor training with a·L_backdoor + b·(1 − cos(w, w^t)); (2) the noise-mask
step on the upload; (4, simplified) indicator coordinates planted in the uploads whose value in
the next global model tells whether the attackers' updates were accepted, and a feedback rule
that raises the noise weight α after a rejection and lowers it back after an acceptance.
Not implemented: (3) decoy models, and tuning the number of decoys and the scaling.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import (Attack, RoundView, check_state_keys,
                                      state_tensor)
from fisherguard.attacks.pixel import BadNetsPixelPoison, PixelPatch, check, check_poison_options
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.training import Upload

Tensor = torch.Tensor


def constrained_loss(backdoor: Tensor, params: Sequence[Tensor], global_flat: Tensor, *,
                     a: float, b: float) -> Tensor:
    """a·L_backdoor + b·(1 − cos(w, w^t)), differentiable in the parameters."""
    w = torch.cat([p.reshape(-1) for p in params])
    cos = F.cosine_similarity(w, global_flat.to(w.dtype), dim=0)
    return a * backdoor + b * (1.0 - cos)


class ConstrainedLoss(TrainingModifier):
    """3DFed's training loss: the poisoned-data loss traded against cosine distance to w^t."""

    name = "3dfed-loss"

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self.global_flat = start_weights.detach().clone()

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        return constrained_loss(loss, params, self.global_flat, a=self.a, b=self.b)


def noise_mask(delta: Tensor, reference: Tensor, *, fraction: float, alpha: float, steps: int,
               lr: float) -> Tensor:
    """Noise n on the ``fraction`` of coordinates with the smallest |Δ| (low importance), found by
    Adam on 1 − cos(Δ + n, reference) with ‖n‖₂ ≤ α·‖Δ‖₂ after every step; returns n."""
    k = int(round(fraction * delta.numel()))
    n = torch.zeros_like(delta)
    bound = alpha * float(delta.norm())
    if k == 0 or steps == 0 or bound == 0.0 or float(reference.norm()) == 0.0:
        return n
    mask = torch.zeros_like(delta)
    mask[torch.topk(delta.abs(), k, largest=False).indices] = 1.0
    v = torch.zeros_like(delta, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 1.0 - F.cosine_similarity(delta + v * mask, reference, dim=0)
        loss.backward()
        opt.step()
        with torch.no_grad():
            norm = float((v * mask).norm())
            if norm > bound:
                v.mul_(bound / norm)
    return (v * mask).detach()


class ThreeDFed(BadNetsPixelPoison, Attack):
    """3DFed, Li et al. IEEE S&P 2023, partial: constrained loss, noise mask, indicators (docs/attacks.md §3.10)."""

    name = "3dfed"
    paper = "Li, Ye, Hu, Li, Wang, Fang, Shi, IEEE S&P 2023"
    summary = ("adaptive backdoor (partial): cosine-constrained training loss, optimised noise "
               "mask, indicator feedback adapting the noise weight; no decoys")
    kind = "model poisoning"
    knowledge = "colluding"  # the attackers plant the same indicators from their joint updates
    per_client = True

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, channels: int = 3,
                 family: str = "fdcr", a: float = 0.6, b: float = 0.4, noise_steps: int = 20,
                 noise_lr: float = 0.01, noise_alpha: float = 0.1,
                 noise_fraction: float = 0.5, indicators: int = 5, indicator_shift: float = 5.0,
                 alpha_step: float = 0.1, alpha_max: float = 1.0) -> None:
        check_poison_options("3dfed", target, poison_prob)
        check(lambda: channels in (1, 3), "3dfed", "channels", "1 or 3", channels)
        check(lambda: family in ("fdcr", "sdfc"), "3dfed", "family", "'fdcr' or 'sdfc'", family)
        check(lambda: a >= 0, "3dfed", "a", "≥ 0", a)
        check(lambda: b >= 0, "3dfed", "b", "≥ 0", b)
        check(lambda: a + b > 0, "3dfed", "a", "such that a + b > 0", (a, b))
        check(lambda: isinstance(noise_steps, int) and noise_steps >= 0, "3dfed", "noise_steps",
              "an int ≥ 0 (the compute budget: noise-mask steps per upload and round)",
              noise_steps)
        check(lambda: noise_lr > 0, "3dfed", "noise_lr", "> 0", noise_lr)
        check(lambda: noise_alpha >= 0, "3dfed", "noise_alpha", "≥ 0", noise_alpha)
        check(lambda: 0.0 <= noise_fraction <= 1.0, "3dfed", "noise_fraction", "in [0, 1]",
              noise_fraction)
        check(lambda: isinstance(indicators, int) and indicators >= 0, "3dfed", "indicators",
              "an int ≥ 0 (0: no indicator feedback)", indicators)
        check(lambda: indicator_shift > 0, "3dfed", "indicator_shift", "> 0", indicator_shift)
        check(lambda: alpha_step >= 0, "3dfed", "alpha_step", "≥ 0", alpha_step)
        check(lambda: alpha_max >= noise_alpha, "3dfed", "alpha_max", "≥ noise_alpha", alpha_max)
        self.indicators, self.indicator_shift = indicators, indicator_shift
        self.alpha_step, self.alpha_max = alpha_step, alpha_max
        self.alpha = noise_alpha  # the noise weight in force, adapted by the indicator feedback
        self._planted: tuple[Tensor, Tensor] | None = None  # (indices, shift) of the last round
        self.feedback: list[dict[str, float]] = []
        self.target, self.poison_prob, self.channels, self.family = (target, poison_prob,
                                                                     channels, family)
        self.a, self.b = a, b
        self.noise_steps, self.noise_lr = noise_steps, noise_lr
        self.noise_alpha, self.noise_fraction = noise_alpha, noise_fraction
        self.trigger: PixelPatch | None = None
        self._prev_global: Tensor | None = None
        self.last_noise_norm: dict[int, float] = {}

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        return ConstrainedLoss(self.a, self.b)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """Read the indicators, adapt α, add the noise mask to each own upload, plant new indicators."""
        g = view.global_weights.detach()
        reference = None if self._prev_global is None else g - self._prev_global
        if reference is not None and self._planted is not None:
            self.read_indicators(reference)
        self._prev_global = g.clone()
        self.last_noise_norm = {}
        own = {cid: u for cid, u in view.own.items()
               if isinstance(u.weights, torch.Tensor) and u.weights.shape == g.shape}
        for cid, u in own.items():
            if reference is None:  # the first attack round has no earlier global model
                break
            delta = u.weights.detach() - g
            n = noise_mask(delta, reference, fraction=self.noise_fraction, alpha=self.alpha,
                           steps=self.noise_steps, lr=self.noise_lr)
            u.weights = g + delta + n
            self.last_noise_norm[cid] = float(n.norm())
        self._planted = self.plant(g, own) if self.indicators > 0 and own else None
        return view.own

    def plant(self, g: Tensor, own: dict[int, Upload]) -> tuple[Tensor, Tensor]:
        """Set the ``indicators`` coordinates the attackers' updates change least to w^t + c.

        c = ``indicator_shift`` · mean |Δ| over the attackers' updates, the same in every upload.
        """
        deltas = torch.stack([u.weights.detach() - g for u in own.values()])
        mean_abs = deltas.abs().mean(0)
        k = min(self.indicators, g.numel())
        idx = torch.topk(mean_abs, k, largest=False).indices
        shift = self.indicator_shift * float(mean_abs.mean())
        for u in own.values():
            w = u.weights.detach().clone()
            w[idx] = g[idx] + shift
            u.weights = w
        return idx, torch.tensor(shift)

    def read_indicators(self, update: Tensor) -> None:
        """ρ = mean over indicators of (w^{t+1} − w^t)/c; accepted when ρ ≥ half the attackers' count share.

        Under FedAvg an accepted round moves the indicators by about the attackers' weight share
        times c, a rejected one by the benign drift of low-importance coordinates (≈ 0). After a
        rejection α grows by ``alpha_step`` (up to ``alpha_max``); after an acceptance it shrinks
        by the same step, not below ``noise_alpha``.
        """
        assert self._planted is not None
        idx, shift = self._planted
        rho = float((update[idx] / shift).mean()) if float(shift) != 0.0 else 0.0
        ctx = getattr(self, "ctx", None)
        share = len(ctx.attackers) / max(ctx.num_clients, 1) if ctx is not None else 0.0
        accepted = rho >= 0.5 * share
        if accepted:
            self.alpha = max(self.noise_alpha, self.alpha - self.alpha_step)
        else:
            self.alpha = min(self.alpha_max, self.alpha + self.alpha_step)
        self.feedback.append({"rho": rho, "accepted": float(accepted), "alpha": self.alpha})

    STATE = ("prev_global", "alpha", "planted_idx", "planted_shift", "feedback")

    def state_dict(self) -> dict[str, Any]:
        """What the next round reads: w^{t−1} (the previous global model, for the reference
        update), the noise weight α in force, the planted indicators (indices, shift) to read
        back, and the feedback log. The trigger is fixed at bind, ``last_noise_norm`` is reset
        every round."""
        planted = self._planted
        return {"prev_global": None if self._prev_global is None else self._prev_global.clone(),
                "alpha": float(self.alpha),
                "planted_idx": None if planted is None else planted[0].clone(),
                "planted_shift": None if planted is None else planted[1].clone(),
                "feedback": [dict(f) for f in self.feedback]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = self.name
        check_state_keys(name, state, self.STATE)
        prev = state["prev_global"]
        if prev is not None:
            prev = state_tensor(name, "prev_global", prev)
            if prev.dim() != 1:
                raise ValueError(f"attack {name!r}: state 'prev_global' must be a flat model, "
                                 f"got shape {tuple(prev.shape)}")
        alpha = state["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"attack {name!r}: state 'alpha' must be a number, got {alpha!r}")
        idx, shift = state["planted_idx"], state["planted_shift"]
        if (idx is None) != (shift is None):
            raise ValueError(f"attack {name!r}: planted_idx and planted_shift go together")
        planted = None
        if idx is not None:
            idx = state_tensor(name, "planted_idx", idx)
            shift = state_tensor(name, "planted_shift", shift, ())
            if idx.dim() != 1 or idx.dtype != torch.long:
                raise ValueError(f"attack {name!r}: state 'planted_idx' must be a 1-D long tensor")
            planted = (idx, shift)
        feedback = state["feedback"]
        if not isinstance(feedback, list) or not all(isinstance(f, dict) for f in feedback):
            raise ValueError(f"attack {name!r}: state 'feedback' must be a list of dicts")
        self._prev_global, self.alpha, self._planted = prev, float(alpha), planted
        self.feedback = [dict(f) for f in feedback]
