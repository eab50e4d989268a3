"""How an attacker changes its own local training (docs/attacks.md §1, "training modifier").

The trainer calls these hooks around each SGD step; the base class changes nothing. Attacks
(``fisherguard.attacks``) subclass it: boosted optimiser settings (``plan``), loss terms
(constrain-and-scale), gradient masks (Neurotoxin), projections after each step (PGD). A job with
a modifier always takes the per-client reference path, never the grouped ensemble.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fisherguard.clients.plan import TrainPlan

Tensor = torch.Tensor


class TrainingModifier:
    """No-op hooks around one client's local training; subclasses override what they change."""

    name = "none"

    def plan(self, plan: TrainPlan) -> TrainPlan:
        """The optimiser settings this client trains with (boosted attacks change lr or epochs)."""
        return plan

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        """Called once before the first step, with the model loaded at ``start_weights``."""

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        """Called before each step (step counts from 0): e.g. a learning-rate schedule."""

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        """The loss to minimise, given the protocol's (cross-entropy plus any regulariser)."""
        return loss

    def after_backward(self, params: Sequence[Tensor]) -> None:
        """Called after backward, before the optimiser step: e.g. a gradient mask."""

    def after_step(self, params: Sequence[Tensor]) -> None:
        """Called after each optimiser step: e.g. a projection onto a norm ball."""


class Chain(TrainingModifier):
    """Several modifiers applied in order (composed attack stages)."""

    def __init__(self, parts: Sequence[TrainingModifier]) -> None:
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)

    def plan(self, plan: TrainPlan) -> TrainPlan:
        for p in self.parts:
            plan = p.plan(plan)
        return plan

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        for p in self.parts:
            p.begin(model, params, start_weights)

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        for p in self.parts:
            p.before_step(optimizer, step, steps_per_epoch)

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        for p in self.parts:
            loss = p.loss(loss, ce, model, params, x, y)
        return loss

    def after_backward(self, params: Sequence[Tensor]) -> None:
        for p in self.parts:
            p.after_backward(params)

    def after_step(self, params: Sequence[Tensor]) -> None:
        for p in self.parts:
            p.after_step(params)


class Timed(TrainingModifier):
    """A modifier whose hooks' own seconds are summed (the attack's share of local training)."""

    def __init__(self, inner: TrainingModifier) -> None:
        self.inner, self.name, self.seconds = inner, inner.name, 0.0

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def plan(self, plan: TrainPlan) -> TrainPlan:
        return self._timed(self.inner.plan, plan)

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self._timed(self.inner.begin, model, params, start_weights)

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        self._timed(self.inner.before_step, optimizer, step, steps_per_epoch)

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        return self._timed(self.inner.loss, loss, ce, model, params, x, y)

    def after_backward(self, params: Sequence[Tensor]) -> None:
        self._timed(self.inner.after_backward, params)

    def after_step(self, params: Sequence[Tensor]) -> None:
        self._timed(self.inner.after_step, params)
