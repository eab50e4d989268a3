"""Constrain-and-scale (Bagdasaryan et al., AISTATS 2020): an anomaly term in the loss, then scaling
(docs/attacks.md §3.3)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import (Attack, AttackConfigError, RoundView, check_state_keys,
                                      state_tensor)
from fisherguard.attacks.scaling import (Boost, check_boost, check_gamma, check_positive,
                                         flat_delta, resolve_gamma, scale_uploads)
from fisherguard.clients.modifier import Chain, TrainingModifier
from fisherguard.clients.training import Upload
from fisherguard.models import flatten

Tensor = torch.Tensor
ANOMALY = ("l2", "cosine")


class PreviousGlobal:
    """u = w^t − w^{t−1}, from the models an attacker received in consecutive attack rounds.

    Kept from the start weights handed to ``training`` (not ``begin_round``), so that it works on
    every engine: a client node sees exactly the models it received. None when the attacker did
    not train in the previous round (first round, or an idle round before this one).
    """

    def __init__(self) -> None:
        self.seen: dict[int, Tensor] = {}

    def update(self, round_idx: int, start_weights: Tensor) -> Tensor | None:
        if round_idx not in self.seen:
            self.seen = {r: w for r, w in self.seen.items() if r == round_idx - 1}
            self.seen[round_idx] = start_weights.detach().clone()
        prev = self.seen.get(round_idx - 1)
        return None if prev is None else self.seen[round_idx] - prev

    def state_dict(self) -> dict[str, Any]:
        rounds = sorted(self.seen)
        return {"rounds": rounds, "weights": [self.seen[r].detach().clone() for r in rounds]}

    def load_state_dict(self, attack: str, state: dict[str, Any], numel: int | None) -> None:
        """Restore the kept models; ``numel``: the flat model's size, when known."""
        rounds, weights = state.get("rounds"), state.get("weights")
        if (not isinstance(rounds, list) or not isinstance(weights, list)
                or len(rounds) != len(weights)
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds)):
            raise ValueError(f"attack {attack!r}: previous-global state needs equal-length lists "
                             f"'rounds' (ints) and 'weights' (tensors)")
        seen = {}
        for r, w in zip(rounds, weights):
            shape = (numel,) if numel is not None else (w.numel(),) if isinstance(w, Tensor) else None
            seen[r] = state_tensor(attack, f"weights[{r}]", w, shape)
        self.seen = seen


def model_numel(attack: Attack) -> int | None:
    """The size of the federation's flat model (None before ``bind`` or without a model)."""
    ctx = getattr(attack, "ctx", None)
    if ctx is None or ctx.model_factory is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building the model must not move the global stream
        return int(flatten(ctx.model_factory()).numel())


def load_previous(attack: Attack, previous: PreviousGlobal, state: dict[str, Any]) -> None:
    """``load_state_dict`` of a stage whose only cross-round state is its ``PreviousGlobal``."""
    check_state_keys(attack.name, state, ("previous",))
    if not isinstance(state["previous"], dict):
        raise ValueError(f"attack {attack.name!r}: state 'previous' must be a dict")
    check_state_keys(attack.name, state["previous"], ("rounds", "weights"))
    previous.load_state_dict(attack.name, state["previous"], model_numel(attack))


class AnomalyLoss(TrainingModifier):
    """L = α·L_class + (1 − α)·L_ano, L_ano = ‖X − w^t‖² or 1 − cos(X − w^t, u), both in torch."""

    name = "constrain"

    def __init__(self, alpha: float, anomaly: str, direction: Tensor | None = None) -> None:
        self.alpha, self.anomaly = float(alpha), anomaly
        self.direction = direction  # u, for the cosine term
        self.start: list[Tensor] = []

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self.start = [p.detach().clone() for p in params]

    def anomaly_loss(self, params: Sequence[Tensor]) -> Tensor:
        delta = flat_delta(params, self.start)
        if self.anomaly == "cosine" and self.direction is not None:
            if not bool(delta.detach().any()):
                # cos(0, u) is undefined: no direction to penalise before the first step
                return delta.sum() * 0.0
            return 1.0 - F.cosine_similarity(delta, self.direction.to(delta.dtype), dim=0)
        return delta.pow(2).sum()

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        return self.alpha * loss + (1.0 - self.alpha) * self.anomaly_loss(params)


class ConstrainAndScale(Attack):
    """Train on α·L_class + (1 − α)·L_ano, then upload w^t + γ(X − w^t) with ‖γ(X − w^t)‖ ≤ S (Bagdasaryan et al., 2020, eq. 4 and 3; docs/attacks.md §3.3)."""

    name = "constrain-and-scale"
    paper = "Bagdasaryan et al., AISTATS 2020"
    summary = "anomaly term (L2 distance or cosine to the last global update) in the loss, then scaling"
    kind = "model poisoning"
    knowledge = "model"
    per_client = True

    def __init__(self, *, alpha: float = 0.5, anomaly: str = "l2", gamma: float | str = "K",
                 norm_cap: float | None = None, lr: float | None = None,
                 epochs: int | None = None, step_epochs: int | None = None,
                 step_factor: float = 0.1) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise AttackConfigError(f"{self.name} option alpha must be a number in [0, 1], "
                                    f"got {alpha!r}")
        if anomaly not in ANOMALY:
            raise AttackConfigError(f"{self.name} option anomaly must be one of "
                                    f"{', '.join(ANOMALY)}, got {anomaly!r}")
        check_gamma(self.name, gamma)
        check_positive(self.name, "norm_cap", norm_cap, allow_none=True)
        check_boost(self.name, lr, epochs, step_epochs, step_factor)
        self.alpha, self.anomaly, self.gamma, self.norm_cap = alpha, anomaly, gamma, norm_cap
        self.lr, self.epochs = lr, epochs
        self.step_epochs, self.step_factor = step_epochs, step_factor
        self.previous = PreviousGlobal()

    def training(self, client_id: int, round_idx: int,
                 start_weights: Tensor) -> TrainingModifier | None:
        u = self.previous.update(round_idx, start_weights) if self.anomaly == "cosine" else None
        if u is not None and not bool(u.any()):
            u = None
        term = AnomalyLoss(self.alpha, self.anomaly, u)  # cosine without u falls back to L2
        boost = Boost(self.lr, self.epochs, self.step_epochs, self.step_factor)
        return Chain([boost, term]) if boost.active else term

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        return scale_uploads(view, resolve_gamma(self.gamma, self.ctx.num_clients), self.norm_cap)

    def state_dict(self) -> dict[str, Any]:
        """The global models last received (w^{t−1} for the cosine term's u), by round."""
        return {"previous": self.previous.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_previous(self, self.previous, state)
