"""PGD with norm projection (Sun et al. 2019; Wang et al. 2020): keep ‖w − w^t‖ ≤ ε (docs/attacks.md §3.4).

Also the attacker's clean reference update Δ_ref (trained from w^t on its own clean samples with
the benign optimiser), which sets PGD's default ε and Neurotoxin's code-variant mask.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch

from fisherguard.attacks.base import Attack, AttackConfigError, AttackContext, RoundView
from fisherguard.attacks.scaling import check_positive, flat_delta
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import ClientJob, SequentialTrainer, Upload
from fisherguard.seeding import torch_stream

Tensor = torch.Tensor


class CleanReference:
    """Δ_ref per (client, round): the attacker's clean update from w^t with the benign optimiser."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.trainer: SequentialTrainer | None = None
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.seconds: dict[int, float] = {}  # per client: the last reference training's time

    def update(self, ctx: AttackContext, client_id: int, round_idx: int, start: Tensor) -> Tensor:
        key = (client_id, round_idx)
        if key not in self.cache:
            if ctx.model_factory is None or ctx.plan is None or client_id not in ctx.clean_data:
                raise AttackConfigError(f"{self.tag}: the clean reference update needs the model, "
                                        f"the benign optimiser and client {client_id}'s clean data")
            t0 = time.perf_counter()
            if self.trainer is None:
                with torch.random.fork_rng():  # building models must not move the global stream
                    self.trainer = SequentialTrainer(ctx.model_factory)
            job = ClientJob(client_id, start, ctx.clean_data[client_id],
                            torch_stream(ctx.seed, self.tag, client_id, round_idx))
            result = self.trainer.train_one(job, ctx.plan)
            self.cache = {k: v for k, v in self.cache.items() if k[1] >= round_idx}
            self.cache[key] = result.weights - start
            self.seconds[client_id] = time.perf_counter() - t0
        return self.cache[key]


def check_eps(attack: str, eps: Any, *, allow_off: bool = False) -> None:
    if eps == "reference" or (allow_off and eps == "off"):
        return
    if isinstance(eps, str) or isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isfinite(eps) or eps <= 0:
        off = ", 'off'" if allow_off else ""
        raise AttackConfigError(f"{attack} option eps must be 'reference' (the norm of a clean "
                                f"update){off} or a number > 0, got {eps!r}")


def radius_of(eps: float | str, reference: CleanReference, attack: Attack, client_id: int,
              round_idx: int, start_weights: Tensor) -> float:
    """ε for one attacker and round: ``"reference"`` is ‖Δ_ref‖₂ (the clean update's norm, from
    the bound ``attack.ctx``), a number is itself (shared by pgd and neurotoxin)."""
    if eps == "reference":
        ref = reference.update(attack.ctx, client_id, round_idx, start_weights)
        return float(torch.linalg.vector_norm(ref))
    return float(eps)


class Projection(TrainingModifier):
    """After every ``every`` steps and after the last one: w ← w^t + (w − w^t)·min(1, ε/‖w − w^t‖).

    ``eps=None`` keeps the step bookkeeping and projects nothing (Neurotoxin with ``eps: off``).
    """

    name = "pgd"

    def __init__(self, eps: float | None, every: int = 1) -> None:
        self.eps = None if eps is None else float(eps)
        self.every = int(every)
        self.start: list[Tensor] = []
        self.epochs = 0
        self.steps_per_epoch = 0
        self.step = 0

    def plan(self, plan: TrainPlan) -> TrainPlan:
        self.epochs = plan.epochs
        return plan

    def begin(self, model: torch.nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self.start = [p.detach().clone() for p in params]
        self.step = 0

    def before_step(self, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    def after_step(self, params: Sequence[Tensor]) -> None:
        self.step += 1
        last = self.step == self.epochs * self.steps_per_epoch
        if self.eps is not None and (self.step % self.every == 0 or last):
            project(params, self.start, self.eps)


@torch.no_grad()
def project(params: Sequence[Tensor], start: Sequence[Tensor], eps: float) -> None:
    """In place: params ← start + (params − start)·min(1, ε/‖params − start‖₂) (all layers jointly)."""
    norm = float(torch.linalg.vector_norm(flat_delta(params, start)))
    if norm > eps:
        c = eps / norm
        for p, s in zip(params, start):
            p.copy_(s + (p - s) * c)


def with_reference_time(uploads: dict[int, Upload], reference: CleanReference) -> dict[int, Upload]:
    """Note the clean reference training's seconds in the upload's stats (the round record shows
    them under clients.train; the engine's attack_s does not see work done in the training stage)."""
    out = dict(uploads)
    for cid, up in uploads.items():
        if cid in reference.seconds:
            out[cid] = dataclasses.replace(up, stats={**up.stats,
                                                      "attack_reference_s": reference.seconds[cid]})
    reference.seconds = {}
    return out


def project_uploads(view: RoundView, eps: dict[int, float], gamma: float = 1.0) -> dict[int, Upload]:
    """Each own upload w^t + c·(w_k − w^t) with c = min(γ, ε_k/‖w_k − w^t‖): optional replacement
    within the bound, and a final guarantee of ‖Δ‖ ≤ ε whatever ran after the projection."""
    out: dict[int, Upload] = {}
    g = view.global_weights
    for cid, up in view.own.items():
        w = up.weights
        if cid not in eps or not (isinstance(w, Tensor) and w.shape == g.shape
                                  and w.is_floating_point()):
            out[cid] = up
            continue
        delta = w - g
        norm = float(torch.linalg.vector_norm(delta))
        c = min(float(gamma), eps[cid] / norm) if norm > 0 else 1.0
        out[cid] = up if c == 1.0 else dataclasses.replace(up, weights=g + c * delta)
    return out


class PGD(Attack):
    """Norm-bounded training: project onto ‖w − w^t‖₂ ≤ ε every s steps (Sun et al., 2019, norm-bounded attacker; Wang et al., 2020, PGD; docs/attacks.md §3.4)."""

    name = "pgd"
    paper = "Sun et al., arXiv 2019; Wang et al., NeurIPS 2020"
    summary = "projected training: ||w - w^t|| <= eps (default: the norm of a clean update) every step"
    kind = "model poisoning"
    knowledge = "model"
    per_client = True

    def __init__(self, *, eps: float | str = "reference", every: int = 1,
                 gamma: float = 1.0) -> None:
        check_eps(self.name, eps)
        check_positive(self.name, "every", every, integer=True)
        check_positive(self.name, "gamma", gamma)
        self.eps, self.every, self.gamma = eps, every, gamma
        self.reference = CleanReference("pgd-reference")
        self.bounds: dict[int, float] = {}  # this round's ε per attacker

    def radius(self, client_id: int, round_idx: int, start_weights: Tensor) -> float:
        return radius_of(self.eps, self.reference, self, client_id, round_idx, start_weights)

    def training(self, client_id: int, round_idx: int,
                 start_weights: Tensor) -> TrainingModifier | None:
        eps = self.radius(client_id, round_idx, start_weights)
        self.bounds[client_id] = eps
        return Projection(eps, self.every)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        # on Flower the bound was set on the client node: recompute it here when it is not known
        eps = {cid: self.bounds[cid] if cid in self.bounds
               else self.radius(cid, view.round_idx, view.global_weights) for cid in view.own}
        self.bounds = {}
        return with_reference_time(project_uploads(view, eps, self.gamma), self.reference)
