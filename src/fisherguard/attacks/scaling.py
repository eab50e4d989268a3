"""Model replacement (Bagdasaryan et al., AISTATS 2020): upload w^t + γ(X − w^t) (docs/attacks.md §3.2).

Also the pieces the other model-poisoning attacks share: the boosted poison optimiser (own lr,
epochs, step decay) and the scaling of an upload, optionally capped in norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from fisherguard.attacks.base import Attack, AttackConfigError, RoundView
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import Upload

Tensor = torch.Tensor


def check_positive(attack: str, option: str, value: Any, *, allow_none: bool = False,
                   integer: bool = False) -> None:
    """A finite number > 0 (an int when ``integer``), or None when allowed; else a named error."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
        and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        extra = " or null" if allow_none else ""
        raise AttackConfigError(f"{attack} option {option} must be {kind} > 0{extra}, got {value!r}")


def check_gamma(attack: str, gamma: Any) -> None:
    """γ: "K" (the number of clients, the equal-size guess) or a number > 0."""
    if gamma == "K":
        return
    if isinstance(gamma, str) or isinstance(gamma, bool) or not isinstance(gamma, (int, float)) \
            or not math.isfinite(gamma) or gamma <= 0:
        raise AttackConfigError(f"{attack} option gamma must be 'K' (the number of clients) or a "
                                f"number > 0, got {gamma!r}")


def check_boost(attack: str, lr: Any, epochs: Any, step_epochs: Any, step_factor: Any) -> None:
    check_positive(attack, "lr", lr, allow_none=True)
    check_positive(attack, "epochs", epochs, allow_none=True, integer=True)
    check_positive(attack, "step_epochs", step_epochs, allow_none=True, integer=True)
    check_positive(attack, "step_factor", step_factor)


class Boost(TrainingModifier):
    """Boosted poison training: own lr and epochs, lr × step_factor every step_epochs epochs."""

    name = "boost"

    def __init__(self, lr: float | None, epochs: int | None, step_epochs: int | None,
                 step_factor: float) -> None:
        self.lr, self.epochs = lr, epochs
        self.step_epochs, self.step_factor = step_epochs, step_factor
        self.base_lr: float | None = None

    @property
    def active(self) -> bool:
        return self.lr is not None or self.epochs is not None or self.step_epochs is not None

    def plan(self, plan: TrainPlan) -> TrainPlan:
        changes: dict[str, Any] = {}
        if self.lr is not None:
            changes["lr"] = float(self.lr)
        if self.epochs is not None:
            changes["epochs"] = int(self.epochs)
        plan = dataclasses.replace(plan, **changes)
        self.base_lr = plan.lr
        return plan

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        if self.step_epochs is None or self.base_lr is None:
            return
        epoch = step // max(1, steps_per_epoch)
        lr = self.base_lr * self.step_factor ** (epoch // self.step_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr


def resolve_gamma(gamma: float | str, num_clients: int) -> float:
    return float(num_clients) if gamma == "K" else float(gamma)


def scale_uploads(view: RoundView, gamma: float, norm_cap: float | None = None) -> dict[int, Upload]:
    """Each own upload becomes w^t + c·(w_k − w^t), c = γ, capped so that ‖c(w_k − w^t)‖ ≤ norm_cap.

    The Fisher, sample count and stats stay those of the trained (unscaled) model X.
    """
    out: dict[int, Upload] = {}
    g = view.global_weights
    for cid, up in view.own.items():
        w = up.weights
        if not (isinstance(w, Tensor) and w.shape == g.shape and w.is_floating_point()):
            out[cid] = up  # a malformed upload goes on to be judged as it is
            continue
        delta = w - g
        c = float(gamma)
        if norm_cap is not None:
            norm = float(torch.linalg.vector_norm(delta))
            if c * norm > norm_cap:
                c = norm_cap / norm
        out[cid] = dataclasses.replace(up, weights=g + c * delta)
    return out


class Scaling(Attack):
    """Model replacement: upload L̃ = w^t + γ(X − w^t) (Bagdasaryan et al., 2020, eq. 3; docs/attacks.md §3.2)."""

    name = "scaling"
    paper = "Bagdasaryan et al., AISTATS 2020"
    summary = "model replacement: the trained update scaled by gamma (default K) before upload"
    kind = "model poisoning"
    knowledge = "model"
    per_client = False  # only with the boost options (lr, epochs, step_epochs) set

    def __init__(self, *, gamma: float | str = "K", lr: float | None = None,
                 epochs: int | None = None, step_epochs: int | None = None,
                 step_factor: float = 0.1) -> None:
        check_gamma(self.name, gamma)
        check_boost(self.name, lr, epochs, step_epochs, step_factor)
        self.gamma, self.lr, self.epochs = gamma, lr, epochs
        self.step_epochs, self.step_factor = step_epochs, step_factor

    def boost(self) -> Boost | None:
        b = Boost(self.lr, self.epochs, self.step_epochs, self.step_factor)
        return b if b.active else None

    def training(self, client_id: int, round_idx: int,
                 start_weights: Tensor) -> TrainingModifier | None:
        return self.boost()

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        return scale_uploads(view, resolve_gamma(self.gamma, self.ctx.num_clients))


def flat_delta(params: Sequence[Tensor], start: Sequence[Tensor]) -> Tensor:
    """X − w^t as one differentiable (P,) vector."""
    return torch.cat([(p - s).reshape(-1) for p, s in zip(params, start)])
