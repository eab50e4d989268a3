"""IBA (Nguyen et al., NeurIPS 2023): an ε-bounded input-specific trigger generator (docs/attacks.md §3.8)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fisherguard.attacks.base import Attack, AttackContext, check_state_keys, state_tensor
from fisherguard.attacks.pixel import (PerEpochPoison, backdoor_loss, check,
                                       check_poison_options, clean_pixels, context_pipeline,
                                       frozen_copy, local_asr, minibatches, to_normalised,
                                       to_pixels)
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.data.transforms import Pipeline
from fisherguard.models import load_flat
from fisherguard.seeding import derive_seed, torch_stream

Tensor = torch.Tensor


class Generator(nn.Module):
    """A small conv autoencoder for C×32×32: 32×32 → 16×16 → 8×8 → back, tanh output in [−1, 1]."""

    def __init__(self, channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GeneratorTrigger:
    """x̃ = clip_[0,1](x + ε·G(x)) in pixel space; ‖x̃ − x‖∞ ≤ ε for every x in [0, 1]."""

    channel_uniform = False

    def __init__(self, generator: Generator, eps: float, pipeline: Pipeline) -> None:
        self.generator, self.eps, self.pipeline = generator, eps, pipeline

    def pixels(self, x_pix: Tensor) -> Tensor:
        return (x_pix + self.eps * self.generator(x_pix)).clamp(0.0, 1.0)

    def apply(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return to_normalised(self.pixels(to_pixels(x, self.pipeline)), self.pipeline)


class Project(TrainingModifier):
    """PGD: project the local model onto ‖w − w_start‖₂ ≤ bound after every step."""

    name = "iba-pgd"

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self.start = [t.detach().clone() for t in params]

    def after_step(self, params: Sequence[Tensor]) -> None:
        with torch.no_grad():
            diffs = [p - s for p, s in zip(params, self.start)]
            norm = torch.sqrt(sum((d * d).sum() for d in diffs))
            if float(norm) > self.bound:
                scale = self.bound / float(norm)
                for p, s, d in zip(params, self.start, diffs):
                    p.copy_(s + d * scale)


class IBA(PerEpochPoison, Attack):
    """IBA, Nguyen et al. NeurIPS 2023: generator trigger x + ε·G(x), PGD-bounded update (docs/attacks.md §3.8)."""

    name = "iba"
    paper = "Nguyen, Nguyen, Tran, Doan, Wong, NeurIPS 2023"
    summary = "trigger optimisation: ε-bounded input-specific generator trained against the global model"
    kind = "trigger optimisation"
    knowledge = "model"

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, eps: float = 0.3,
                 generator_lr: float = 0.01, generator_epochs: int = 100,
                 asr_stop: float = 0.7, pgd_bound: float = 0.0, batch_size: int = 64,
                 width: int = 16) -> None:
        check_poison_options("iba", target, poison_prob)
        check(lambda: 0.0 < eps <= 1.0, "iba", "eps", "in (0, 1] (pixel units)", eps)
        check(lambda: generator_lr > 0, "iba", "generator_lr", "> 0", generator_lr)
        check(lambda: isinstance(generator_epochs, int) and generator_epochs >= 0, "iba",
              "generator_epochs", "an int ≥ 0 (the compute budget: generator epochs per attack "
              "round)", generator_epochs)
        check(lambda: 0.0 < asr_stop <= 1.0, "iba", "asr_stop", "in (0, 1]", asr_stop)
        check(lambda: pgd_bound >= 0, "iba", "pgd_bound", "≥ 0 (0: no projection)", pgd_bound)
        check(lambda: isinstance(batch_size, int) and batch_size >= 1,
              "iba", "batch_size", "an int ≥ 1",
              batch_size)
        check(lambda: isinstance(width, int) and width >= 1, "iba", "width", "an int ≥ 1", width)
        self.target, self.poison_prob, self.eps = target, poison_prob, eps
        self.generator_lr, self.generator_epochs = generator_lr, generator_epochs
        self.asr_stop, self.pgd_bound, self.batch_size, self.width = (asr_stop, pgd_bound,
                                                                       batch_size, width)
        self.per_client = pgd_bound > 0  # a projection changes the attacker's training
        self.trigger: GeneratorTrigger | None = None
        self.last_stats: dict[str, float] = {}

    def bind(self, ctx: AttackContext) -> None:
        self.ctx = ctx
        pipeline = context_pipeline(ctx)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(ctx.seed, "iba-generator-init"))
            gen = Generator(pipeline.out_channels, self.width)
        self.trigger = GeneratorTrigger(gen.eval(), self.eps, pipeline)

    def begin_round(self, round_idx: int, global_weights: torch.Tensor) -> None:
        """Train G with Adam on ℓ(f(x̃; θ), y_t), θ the frozen global model; stop at local ASR."""
        ctx, trig = self.ctx, self.trigger
        if not ctx.clean_data or ctx.model_factory is None or trig is None:
            return
        x, y, pipeline = clean_pixels(ctx.clean_data)
        model = frozen_copy(load_flat(ctx.model_factory(), global_weights))
        self.last_stats = train_generator(trig, model, x, y, pipeline, target=self.target,
                                          lr=self.generator_lr, epochs=self.generator_epochs,
                                          asr_stop=self.asr_stop, batch_size=self.batch_size,
                                          generator=torch_stream(ctx.seed, "iba-generator",
                                                                 round_idx))

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        return Project(self.pgd_bound) if self.pgd_bound > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """The generator G's weights (trained on from round to round); None before bind.

        Adam is created afresh in every round's training, so it holds no cross-round state."""
        if self.trigger is None:
            return {"generator": None}
        return {"generator": {k: v.detach().clone()
                              for k, v in self.trigger.generator.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ("generator",))
        saved = state["generator"]
        if saved is None and self.trigger is None:
            return
        if self.trigger is None:
            raise ValueError(f"attack {self.name!r}: a saved generator needs a bound attack")
        if not isinstance(saved, dict):
            raise ValueError(f"attack {self.name!r}: state 'generator' must be a dict of tensors")
        gen = self.trigger.generator
        own = gen.state_dict()
        check_state_keys(self.name, saved, own)
        loaded = {k: state_tensor(self.name, f"generator.{k}", saved[k], tuple(v.shape))
                  for k, v in own.items()}
        gen.load_state_dict(loaded)


def train_generator(trigger: GeneratorTrigger, model: nn.Module, x: Tensor, y: Tensor,
                    pipeline: Pipeline, *, target: int, lr: float, epochs: int, asr_stop: float,
                    batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """Adam on the generator's weights against the frozen model; returns epochs run and local ASR."""
    gen = trigger.generator
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    asr = local_asr(model, x, y, target, trigger.pixels, pipeline)
    ran = 0
    for _ in range(epochs):
        if asr > asr_stop:  # "exceeds": asr_stop = 1 never stops early
            break
        gen.train()
        for idx in minibatches(len(x), batch_size, generator):
            opt.zero_grad(set_to_none=True)
            backdoor_loss(model, trigger.pixels(x[idx]), target, pipeline).backward()
            opt.step()
        gen.eval()
        ran += 1
        asr = local_asr(model, x, y, target, trigger.pixels, pipeline)
    return {"epochs": float(ran), "local_asr": asr}
