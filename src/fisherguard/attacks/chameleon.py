"""Chameleon (Dai and Li, ICML 2023): contrastive encoder stage, then a frozen-encoder head stage (docs/attacks.md §3.9)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import Attack, RoundView
from fisherguard.attacks.pixel import BadNetsPixelPoison, PixelPatch, check, check_poison_options
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import Upload

Tensor = torch.Tensor


def supcon_loss(features: Tensor, labels: Tensor, *, temperature: float = 0.07,
                target: int | None = None, scale: float = 1.0) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) with target-class anchors weighted by ``scale``.

    For anchor i with positives P(i) (same label, not i):
    L_i = −(1/|P(i)|) Σ_{p∈P(i)} log(exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)), z = f/‖f‖;
    the loss is the weighted mean over anchors that have a positive.
    """
    z = F.normalize(features.reshape(len(features), -1), dim=1)
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T) / temperature
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    count = pos.sum(1)
    valid = count > 0
    if not bool(valid.any()):
        return features.sum() * 0.0
    mean_pos = (log_prob.masked_fill(~pos, 0.0)).sum(1)[valid] / count[valid]
    w = torch.ones(n, device=z.device)
    if target is not None:
        w = torch.where(labels == target, torch.full_like(w, scale), w)
    w = w[valid]
    return -(w * mean_pos).sum() / w.sum()


def head_module(model: nn.Module) -> nn.Linear:
    """The classifier head: the model's last linear layer (SimpleCNN: ``cls``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("chameleon needs a model whose last linear layer is the classifier head")
    return linears[-1]


class TwoStage(TrainingModifier):
    """Stage 1: SupCon on the encoder's features (head untouched); stage 2: encoder frozen, head by CE.

    The encoder is every trainable parameter outside the head. At the stage boundary its
    parameters get ``requires_grad = False`` (no gradient, so SGD skips them: no step, no weight
    decay, no momentum), and they are handed back trainable after the last step, because the
    trainer flattens the trainable parameters into the upload.
    """

    name = "chameleon"

    def __init__(self, *, target: int, temperature: float, scale: float, contrastive_epochs: int,
                 head_epochs: int | None, lr: float, momentum: float, weight_decay: float,
                 milestones: Sequence[int], gamma: float) -> None:
        self.target, self.temperature, self.scale = target, temperature, scale
        self.contrastive_epochs, self.head_epochs = contrastive_epochs, head_epochs
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma = tuple(milestones), gamma
        self.head_plan: TrainPlan | None = None
        self.encoder: list[nn.Parameter] = []
        self.encoder_at_freeze: list[Tensor] | None = None  # for tests: the encoder stage 2 starts from
        self.features: Tensor | None = None
        self._hook: Any = None
        self.steps = 0
        self.total = 0
        self.frozen = False
        self.current = 1
        self.contrastive_s = 0.0  # wall time of stage 1 (reported in the upload's stats)
        self._t0: float | None = None

    def plan(self, plan: TrainPlan) -> TrainPlan:
        self.head_plan = plan
        head = plan.epochs if self.head_epochs is None else self.head_epochs
        return replace(plan, epochs=self.contrastive_epochs + head)

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        head = head_module(model)
        head_ids = {id(p) for p in head.parameters()}
        self.encoder = [p for p in params if id(p) not in head_ids]
        self._hook = head.register_forward_hook(self._capture)
        self.steps, self.frozen, self.current = 0, False, 1
        self._t0 = time.perf_counter() if self.contrastive_epochs > 0 else None

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.features = inputs[0]

    def stage(self, step: int, steps_per_epoch: int) -> int:
        return 1 if step // steps_per_epoch < self.contrastive_epochs else 2

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        assert self.head_plan is not None
        epochs = self.contrastive_epochs + (self.head_plan.epochs if self.head_epochs is None
                                            else self.head_epochs)
        self.total = epochs * steps_per_epoch
        epoch = step // steps_per_epoch
        if self.stage(step, steps_per_epoch) == 1:
            lr = self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
            settings = (lr, self.momentum, self.weight_decay)
        else:
            if not self.frozen:
                self.freeze()
            hp = self.head_plan
            settings = (hp.lr, hp.momentum, hp.weight_decay)
        for g in optimizer.param_groups:
            g["lr"], g["momentum"], g["weight_decay"] = settings
        self.current = self.stage(step, steps_per_epoch)

    def _stage1_done(self) -> None:
        if self._t0 is not None:
            self.contrastive_s = time.perf_counter() - self._t0
            self._t0 = None

    def freeze(self) -> None:
        self._stage1_done()
        for p in self.encoder:
            p.requires_grad_(False)
            p.grad = None
        self.encoder_at_freeze = [p.detach().clone() for p in self.encoder]
        self.frozen = True

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        if self.current == 1:
            assert self.features is not None
            return supcon_loss(self.features, y, temperature=self.temperature,
                               target=self.target, scale=self.scale)
        return loss

    def after_step(self, params: Sequence[Tensor]) -> None:
        self.steps += 1
        if self.steps >= self.total:
            self.finish()

    def finish(self) -> None:
        """Make the encoder trainable again and drop the feature hook (idempotent)."""
        self._stage1_done()
        for p in self.encoder:
            p.requires_grad_(True)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.features = None


class Chameleon(BadNetsPixelPoison, Attack):
    """Chameleon, Dai and Li ICML 2023: SupCon encoder stage, frozen-encoder head stage (docs/attacks.md §3.9)."""

    name = "chameleon"
    paper = "Dai, Li, ICML 2023"
    summary = "representation poisoning: supervised-contrastive encoder stage, then the head on a frozen encoder"
    kind = "model poisoning"
    knowledge = "model"
    per_client = True

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, channels: int = 3,
                 family: str = "fdcr", temperature: float = 0.07, scale: float = 2.0,
                 contrastive_epochs: int = 10, head_epochs: int | None = None,
                 contrastive_lr: float = 0.015, contrastive_momentum: float = 0.9,
                 contrastive_weight_decay: float = 5e-4,
                 milestones: Sequence[int] = (2, 4, 6, 8), gamma: float = 0.3) -> None:
        check_poison_options("chameleon", target, poison_prob)
        check(lambda: channels in (1, 3), "chameleon", "channels", "1 or 3", channels)
        check(lambda: family in ("fdcr", "sdfc"), "chameleon", "family", "'fdcr' or 'sdfc'", family)
        check(lambda: temperature > 0, "chameleon", "temperature", "> 0", temperature)
        check(lambda: scale > 0, "chameleon", "scale", "> 0", scale)
        check(lambda: isinstance(contrastive_epochs, int) and contrastive_epochs >= 0, "chameleon",
              "contrastive_epochs", "an int ≥ 0 (the compute budget: contrastive epochs per "
              "attack round)", contrastive_epochs)
        check(lambda: head_epochs is None or (isinstance(head_epochs, int) and head_epochs >= 0),
              "chameleon", "head_epochs", "null (the benign local epochs) or an int ≥ 0",
              head_epochs)
        check(lambda: contrastive_lr > 0, "chameleon", "contrastive_lr", "> 0", contrastive_lr)
        check(lambda: 0 <= contrastive_momentum < 1,
              "chameleon", "contrastive_momentum", "in [0, 1)",
              contrastive_momentum)
        check(lambda: contrastive_weight_decay >= 0, "chameleon", "contrastive_weight_decay", "≥ 0",
              contrastive_weight_decay)
        check(lambda: all(isinstance(m, int) and m >= 1 for m in milestones),
              "chameleon", "milestones",
              "a list of epochs ≥ 1", milestones)
        check(lambda: 0 < gamma <= 1, "chameleon", "gamma", "in (0, 1]", gamma)
        self.target, self.poison_prob, self.channels, self.family = (target, poison_prob,
                                                                     channels, family)
        self.temperature, self.scale = temperature, scale
        self.contrastive_epochs, self.head_epochs = contrastive_epochs, head_epochs
        self.contrastive_lr, self.contrastive_momentum = contrastive_lr, contrastive_momentum
        self.contrastive_weight_decay = contrastive_weight_decay
        self.milestones, self.gamma = milestones, gamma
        self.trigger: PixelPatch | None = None
        self._live: dict[int, TwoStage] = {}

    def modifier(self) -> TwoStage:
        return TwoStage(target=self.target, temperature=self.temperature, scale=self.scale,
                        contrastive_epochs=self.contrastive_epochs, head_epochs=self.head_epochs,
                        lr=self.contrastive_lr, momentum=self.contrastive_momentum,
                        weight_decay=self.contrastive_weight_decay, milestones=self.milestones,
                        gamma=self.gamma)

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        mod = self.modifier()
        self._live[client_id] = mod
        return mod

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """Report each attacker's contrastive-stage seconds in its upload's stats (its cost share)."""
        for cid, mod in self._live.items():
            mod.finish()  # a client with no full batch never reached its last step
            if cid in view.own:
                view.own[cid].stats["contrastive_s"] = mod.contrastive_s
        self._live.clear()
        return view.own
