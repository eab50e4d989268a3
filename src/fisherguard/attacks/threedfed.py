"""3DFed (Li et al., IEEE S&P 2023), partial: constrained loss and noise mask (docs/attacks.md §3.10).

Implemented: (1) backdoor training with a·L_backdoor + b·(1 − cos(w, w^t)); (2) the noise-mask
step on the upload. Not implemented: (3) decoy models and (4) indicator neurons with the feedback
loop that tunes the decoys and scaling; the noise weight α is a fixed option, not adapted.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import Attack, AttackContext, RoundView
from fisherguard.attacks.pixel import PixelPatch, badnets_pixel_patch, check, poisoned_per_epoch
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.data.transforms import Pipeline

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


class ThreeDFed(Attack):
    """3DFed, Li et al. IEEE S&P 2023, partial: constrained loss + noise mask (docs/attacks.md §3.10)."""

    name = "3dfed"
    paper = "Li, Ye, Hu, Li, Wang, Fang, Shi, IEEE S&P 2023"
    summary = ("adaptive backdoor (partial): cosine-constrained training loss and an optimised "
               "noise mask on the upload; no decoys, no indicators")
    kind = "model poisoning"
    knowledge = "model"
    per_client = True

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, channels: int = 3,
                 family: str = "fdcr", a: float = 0.6, b: float = 0.4, noise_steps: int = 20,
                 noise_lr: float = 0.01, noise_alpha: float = 0.1,
                 noise_fraction: float = 0.5) -> None:
        check(isinstance(target, int) and target >= 0, "3dfed", "target", "an int ≥ 0", target)
        check(0.0 <= poison_prob <= 1.0, "3dfed", "poison_prob", "in [0, 1]", poison_prob)
        check(channels in (1, 3), "3dfed", "channels", "1 or 3", channels)
        check(family in ("fdcr", "sdfc"), "3dfed", "family", "'fdcr' or 'sdfc'", family)
        check(a >= 0, "3dfed", "a", "≥ 0", a)
        check(b >= 0, "3dfed", "b", "≥ 0", b)
        check(a + b > 0, "3dfed", "a", "such that a + b > 0", (a, b))
        check(isinstance(noise_steps, int) and noise_steps >= 0, "3dfed", "noise_steps",
              "an int ≥ 0 (the compute budget: noise-mask steps per upload and round)",
              noise_steps)
        check(noise_lr > 0, "3dfed", "noise_lr", "> 0", noise_lr)
        check(noise_alpha >= 0, "3dfed", "noise_alpha", "≥ 0", noise_alpha)
        check(0.0 <= noise_fraction <= 1.0, "3dfed", "noise_fraction", "in [0, 1]",
              noise_fraction)
        self.target, self.poison_prob, self.channels, self.family = (target, poison_prob,
                                                                     channels, family)
        self.a, self.b = a, b
        self.noise_steps, self.noise_lr = noise_steps, noise_lr
        self.noise_alpha, self.noise_fraction = noise_alpha, noise_fraction
        self.trigger: PixelPatch | None = None
        self._prev_global: Tensor | None = None
        self.last_noise_norm: dict[int, float] = {}

    def bind(self, ctx: AttackContext) -> None:
        self.ctx = ctx
        data = next(iter(ctx.clean_data.values()), None)
        pipeline = data.pipeline if data is not None else Pipeline(grey=False)
        self.trigger = badnets_pixel_patch(pipeline.out_channels, self.family, pipeline)

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        return poisoned_per_epoch("3dfed", data, client_id, seed, self.poison_prob, self.target,
                                  self.trigger)

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        return ConstrainedLoss(self.a, self.b)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """Add the noise mask to each own upload, steering it to the last global update's direction."""
        g = view.global_weights.detach()
        reference = None if self._prev_global is None else g - self._prev_global
        self._prev_global = g.clone()
        self.last_noise_norm = {}
        if reference is None:  # the first attack round has no earlier global model
            return view.own
        for cid, u in view.own.items():
            if not (isinstance(u.weights, torch.Tensor) and u.weights.shape == g.shape):
                continue
            delta = u.weights.detach() - g
            n = noise_mask(delta, reference, fraction=self.noise_fraction,
                           alpha=self.noise_alpha, steps=self.noise_steps, lr=self.noise_lr)
            u.weights = g + delta + n
            self.last_noise_norm[cid] = float(n.norm())
        return view.own

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.trigger.apply if self.trigger is not None else None
