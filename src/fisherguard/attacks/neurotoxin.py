"""Neurotoxin (Zhang et al., ICML 2022): train only the coordinates benign clients rarely change,
inside PGD's norm ball (docs/attacks.md §3.5)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from fisherguard.attacks.base import Attack, AttackConfigError, RoundView
from fisherguard.attacks.constrain import PreviousGlobal, load_previous
from fisherguard.attacks.pgd import (CleanReference, Projection, check_eps, project_uploads,
                                     radius_of, with_reference_time)
from fisherguard.attacks.scaling import check_positive
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.training import Upload

Tensor = torch.Tensor
SOURCES = ("global", "gradient")


def topk_mask(u: Tensor, topk: float, sizes: Sequence[int] | None = None) -> Tensor:
    """M (bool, True = trainable): False on the top-k share of |u|, over all of u or per layer."""
    keep = torch.ones(u.numel(), dtype=torch.bool)
    chunks = [u.numel()] if sizes is None else list(sizes)
    offset = 0
    for n in chunks:
        k = min(n, math.ceil(topk * n))
        if k > 0:
            idx = torch.topk(u[offset:offset + n].abs(), k, sorted=False).indices
            keep[offset + idx] = False
        offset += n
    return keep


class MaskedProjection(Projection):
    """g ← g ⊙ M after backward; after the step, masked coordinates are put back to w^t (undoing
    what weight decay and momentum still move) and w is projected onto ‖w − w^t‖ ≤ ε (pgd's
    ``Projection``: the same start, step count and schedule; ``eps=None``: no projection)."""

    name = "neurotoxin"

    def __init__(self, keep: Tensor, eps: float | None, every: int = 1) -> None:
        super().__init__(eps, every)
        self.keep_flat = keep
        self.keep: list[Tensor] = []

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        super().begin(model, params, start_weights)
        self.keep, offset = [], 0
        for p in params:
            self.keep.append(self.keep_flat[offset:offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()

    @torch.no_grad()
    def after_backward(self, params: Sequence[Tensor]) -> None:
        for p, m in zip(params, self.keep):
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self, params: Sequence[Tensor]) -> None:
        for p, s, m in zip(params, self.start, self.keep):
            p.copy_(torch.where(m, p, s))
        super().after_step(params)


class Neurotoxin(Attack):
    """Mask the top-k % coordinates of |u| in every step, u = w^t − w^{t−1}, plus PGD (Zhang et al., 2022, Algorithm 1; docs/attacks.md §3.5)."""

    name = "neurotoxin"
    paper = "Zhang et al., ICML 2022"
    summary = "gradient masked on the top-k % most-changed coordinates of the last global update, plus PGD"
    kind = "model poisoning"
    knowledge = "model"
    per_client = True

    def __init__(self, *, topk: float = 0.01, source: str = "global", per_layer: bool = False,
                 eps: float | str = "reference", every: int = 1) -> None:
        if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk < 1.0:
            raise AttackConfigError(f"{self.name} option topk must be a fraction in (0, 1) "
                                    f"(0.01 = the top 1 %), got {topk!r}")
        if source not in SOURCES:
            raise AttackConfigError(f"{self.name} option source must be one of "
                                    f"{', '.join(SOURCES)}, got {source!r}")
        if not isinstance(per_layer, bool):
            raise AttackConfigError(f"{self.name} option per_layer must be true or false, "
                                    f"got {per_layer!r}")
        check_eps(self.name, eps, allow_off=True)
        check_positive(self.name, "every", every, integer=True)
        self.topk, self.source, self.per_layer = topk, source, per_layer
        self.eps, self.every = eps, every
        self.previous = PreviousGlobal()
        self.reference = CleanReference("pgd-reference")  # the same Δ_ref (and ε) as pgd
        self.bounds: dict[int, float] = {}
        self._sizes: list[int] | None = None

    def layer_sizes(self) -> list[int] | None:
        if not self.per_layer:
            return None
        if self._sizes is None:
            assert self.ctx.model_factory is not None
            with torch.random.fork_rng():
                model = self.ctx.model_factory()
            self._sizes = [p.numel() for p in model.parameters() if p.requires_grad]
        return self._sizes

    def direction(self, client_id: int, round_idx: int, start_weights: Tensor) -> Tensor:
        """u: the last global update (paper), or the attacker's clean update (code variant, and the
        fallback when the previous global model is unknown)."""
        u = self.previous.update(round_idx, start_weights) if self.source == "global" else None
        if u is None or not bool(u.any()):
            u = self.reference.update(self.ctx, client_id, round_idx, start_weights)
        return u

    def radius(self, client_id: int, round_idx: int, start_weights: Tensor) -> float | None:
        if self.eps == "off":
            return None
        return radius_of(self.eps, self.reference, self, client_id, round_idx, start_weights)

    def training(self, client_id: int, round_idx: int,
                 start_weights: Tensor) -> TrainingModifier | None:
        keep = topk_mask(self.direction(client_id, round_idx, start_weights), self.topk,
                         self.layer_sizes())
        eps = self.radius(client_id, round_idx, start_weights)
        if eps is not None:
            self.bounds[client_id] = eps
        return MaskedProjection(keep, eps, self.every)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        if self.eps == "off":
            return with_reference_time(view.own, self.reference)
        eps: dict[int, Any] = {cid: self.bounds[cid] if cid in self.bounds
                               else self.radius(cid, view.round_idx, view.global_weights)
                               for cid in view.own}
        self.bounds = {}
        return with_reference_time(project_uploads(view, eps), self.reference)

    def state_dict(self) -> dict[str, Any]:
        """The global models last received (w^{t−1} for u = w^t − w^{t−1}), by round. The clean
        reference Δ_ref is recomputed per round from its own seeded stream, the mask's layer
        sizes from the model, and ``bounds`` is emptied every round: none of them is state."""
        return {"previous": self.previous.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_previous(self, self.previous, state)
