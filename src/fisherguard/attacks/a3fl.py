"""A3FL (Zhang et al., NeurIPS 2023): a trigger optimised against an unlearned global model (docs/attacks.md §3.7)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import Attack, AttackContext, check_state_keys, state_tensor
from fisherguard.attacks.pixel import (PerEpochPoison, PixelPatch, backdoor_loss, check,
                                       check_poison_options, clean_pixels, context_pipeline,
                                       frozen_copy, local_asr, minibatches, patch_mask,
                                       to_normalised)
from fisherguard.data.transforms import Pipeline
from fisherguard.models import load_flat
from fisherguard.seeding import torch_stream


def conv_cosine(a: nn.Module, b: nn.Module) -> float:
    """Cosine of the two models' convolution weights, flattened (A3FL's λ factor)."""
    wa = torch.cat([m.weight.detach().reshape(-1) for m in a.modules() if isinstance(m, nn.Conv2d)])
    wb = torch.cat([m.weight.detach().reshape(-1) for m in b.modules() if isinstance(m, nn.Conv2d)])
    return float(F.cosine_similarity(wa, wb, dim=0))


class A3FL(PerEpochPoison, Attack):
    """A3FL, Zhang et al. NeurIPS 2023: adversarially adaptive pixel trigger (docs/attacks.md §3.7)."""

    name = "a3fl"
    paper = "Zhang, Jia, Chen, Lin, Wu, NeurIPS 2023"
    summary = "trigger optimisation: pixel patch optimised each round against an unlearned global model"
    kind = "trigger optimisation"
    knowledge = "model"

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, trigger_lr: float = 0.01,
                 lambda0: float = 0.01, adv_epochs: int = 5, adv_every: int = 100,
                 trigger_epochs: int = 100, patch_size: int = 5, init_intensity: float = 0.5,
                 asr_stop: float = 0.7, batch_size: int = 64) -> None:
        check_poison_options("a3fl", target, poison_prob)
        check(lambda: trigger_lr > 0, "a3fl", "trigger_lr", "> 0", trigger_lr)
        check(lambda: lambda0 >= 0, "a3fl", "lambda0", "≥ 0", lambda0)
        check(lambda: isinstance(adv_epochs, int) and adv_epochs >= 0,
              "a3fl", "adv_epochs", "an int ≥ 0",
              adv_epochs)
        check(lambda: isinstance(adv_every, int) and adv_every >= 1,
              "a3fl", "adv_every", "an int ≥ 1",
              adv_every)
        check(lambda: isinstance(trigger_epochs, int) and trigger_epochs >= 0,
              "a3fl", "trigger_epochs",
              "an int ≥ 0 (the compute budget: trigger epochs per attack round)", trigger_epochs)
        check(lambda: isinstance(patch_size, int) and 1 <= patch_size <= 32, "a3fl", "patch_size",
              "an int in 1..32", patch_size)
        check(lambda: 0.0 <= init_intensity <= 1.0,
              "a3fl", "init_intensity", "in [0, 1]", init_intensity)
        check(lambda: 0.0 < asr_stop <= 1.0, "a3fl", "asr_stop", "in (0, 1]", asr_stop)
        check(lambda: isinstance(batch_size, int) and batch_size >= 1,
              "a3fl", "batch_size", "an int ≥ 1",
              batch_size)
        self.target, self.poison_prob = target, poison_prob
        self.trigger_lr, self.lambda0 = trigger_lr, lambda0
        self.adv_epochs, self.adv_every, self.trigger_epochs = adv_epochs, adv_every, trigger_epochs
        self.patch_size, self.init_intensity = patch_size, init_intensity
        self.asr_stop, self.batch_size = asr_stop, batch_size
        self.trigger: PixelPatch | None = None
        self.last_stats: dict[str, float] = {}

    def bind(self, ctx: AttackContext) -> None:
        self.ctx = ctx
        pipeline = context_pipeline(ctx)
        c = pipeline.out_channels
        mask = patch_mask(c, self.patch_size)
        self.trigger = PixelPatch(mask, torch.full((c, 32, 32), self.init_intensity), pipeline)

    def begin_round(self, round_idx: int, global_weights: torch.Tensor) -> None:
        """Optimise δ against the global model θ and its adversarially unlearned copy θ'."""
        ctx = self.ctx
        if not ctx.clean_data or ctx.model_factory is None or self.trigger is None:
            return
        x, y, pipeline = clean_pixels(ctx.clean_data)
        model = frozen_copy(load_flat(ctx.model_factory(), global_weights))
        self.last_stats = optimise_trigger(
            self.trigger, model, x, y, pipeline, target=self.target, lr=self.trigger_lr,
            lambda0=self.lambda0, adv_epochs=self.adv_epochs, adv_every=self.adv_every,
            epochs=self.trigger_epochs, asr_stop=self.asr_stop, batch_size=self.batch_size,
            adv_lr=ctx.plan.lr if ctx.plan else 0.01,
            generator=torch_stream(ctx.seed, "a3fl-trigger", round_idx))

    def state_dict(self) -> dict[str, Any]:
        """δ, the optimised patch (C×32×32 pixels), carried from round to round; None before bind.

        The mask and the pipeline are fixed at ``bind``; θ' and λ are rebuilt inside each round's
        optimisation and ``last_stats`` is only a report, so δ is the whole state."""
        return {"delta": None if self.trigger is None else self.trigger.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ("delta",))
        if state["delta"] is None and self.trigger is None:
            return
        if self.trigger is None:
            raise ValueError(f"attack {self.name!r}: a saved trigger needs a bound attack")
        self.trigger.delta = state_tensor(self.name, "delta", state["delta"],
                                          tuple(self.trigger.delta.shape))


def unlearned_copy(model: nn.Module, trigger: PixelPatch, x: torch.Tensor, y: torch.Tensor,
                   pipeline: Pipeline, *, epochs: int, lr: float, batch_size: int,
                   generator: torch.Generator) -> nn.Module:
    """θ': θ trained on (x ⊕ δ, y_true), simulating the federation unlearning the backdoor."""
    adv = copy.deepcopy(model)
    for p in adv.parameters():
        p.requires_grad_(True)
    adv.train()
    opt = torch.optim.SGD(adv.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for idx in minibatches(len(x), batch_size, generator):
            xb = to_normalised(trigger.pixels(x[idx]), pipeline)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(adv(xb), y[idx]).backward()
            opt.step()
    return frozen_copy(adv)


def optimise_trigger(trigger: PixelPatch, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     pipeline: Pipeline, *, target: int, lr: float, lambda0: float,
                     adv_epochs: int, adv_every: int, epochs: int, asr_stop: float,
                     batch_size: int, adv_lr: float, generator: torch.Generator
                     ) -> dict[str, float]:
    """A3FL's outer loop: δ ← clip_[0,1](δ − η·sign ∇_δ[ℓ(θ) + λ·ℓ(θ')]), early stop at local ASR.

    ``model`` is the frozen global model; the trigger's δ is updated in place. Returns the
    epochs run, the steps and the final local ASR (kept on the attack, never logged per step).
    """
    mask = trigger.mask
    delta = trigger.delta.clone()
    adv, lam, steps, ran = None, 0.0, 0, 0
    asr = local_asr(model, x, y, target, trigger.pixels, pipeline)
    for _ in range(epochs):
        if asr > asr_stop:  # "exceeds": asr_stop = 1 never stops early
            break
        for idx in minibatches(len(x), batch_size, generator):
            if steps % adv_every == 0 and adv_epochs > 0 and lambda0 > 0:
                adv = unlearned_copy(model, trigger, x, y, pipeline, epochs=adv_epochs, lr=adv_lr,
                                     batch_size=batch_size, generator=generator)
                lam = lambda0 * conv_cosine(adv, model)
            d = delta.clone().requires_grad_(True)
            xt = trigger.pixels(x[idx], d)
            loss = backdoor_loss(model, xt, target, pipeline)
            if adv is not None and lam != 0.0:
                loss = loss + lam * backdoor_loss(adv, xt, target, pipeline)
            (grad,) = torch.autograd.grad(loss, d)
            delta = (delta - lr * grad.sign() * mask).clamp_(0.0, 1.0)
            trigger.delta = delta
            steps += 1
        ran += 1
        asr = local_asr(model, x, y, target, trigger.pixels, pipeline)
    trigger.delta = delta
    return {"epochs": float(ran), "steps": float(steps), "local_asr": asr, "lambda": lam}
