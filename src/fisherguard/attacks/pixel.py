"""Pixel-space triggers and the helpers the trigger-optimising attacks share (docs/attacks.md §1).

Learned triggers (A3FL, IBA) and image-like base patterns (Chameleon, 3DFed) live in raw [0, 1]
pixel space. A client's batches and the metrics' test batches are normalised tensors, so a
trigger here un-normalises, writes the pattern, clips to [0, 1] and normalises again. The poisoned
data keeps uint8 images, a poisoned mask and the trigger object (per-epoch augmentation), so a
trigger an attack updates in ``begin_round`` is what each poisoned batch carries when it is drawn.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.badnets import poison_draw, trigger_mask
from fisherguard.attacks.base import AttackConfigError, AttackContext
from fisherguard.clients.training import ClientDataset
from fisherguard.data.transforms import Pipeline
from fisherguard.seeding import numpy_stream


class PixelPatch:
    """x̃ = (1 − m) ⊙ x + m ⊙ δ in pixel space; ``delta`` (C, 32, 32) in [0, 1], updated in place."""

    channel_uniform = False  # a learned pattern may differ by channel: no channel folding

    def __init__(self, mask: torch.Tensor, delta: torch.Tensor, pipeline: Pipeline) -> None:
        self.mask = mask.float()
        self.delta = delta.float().clamp(0.0, 1.0)
        self.pipeline = pipeline

    def pixels(self, x_pix: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The patch written into a pixel batch (differentiable in ``delta``)."""
        d = self.delta if delta is None else delta
        return (1.0 - self.mask) * x_pix + self.mask * d

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_normalised(self.pixels(to_pixels(x, self.pipeline)), self.pipeline)


def to_pixels(x: torch.Tensor, pipeline: Pipeline) -> torch.Tensor:
    """Normalised batch → [0, 1] pixel batch."""
    n = pipeline.normalise
    return (x * n.std + n.mean).clamp(0.0, 1.0)


def to_normalised(x_pix: torch.Tensor, pipeline: Pipeline) -> torch.Tensor:
    n = pipeline.normalise
    return (x_pix - n.mean) / n.std


def patch_mask(channels: int, size: int, where: str = "top-left") -> torch.Tensor:
    """A size×size square on every channel, at the top-left or bottom-right corner."""
    m = torch.zeros(channels, 32, 32)
    if where == "top-left":
        m[:, :size, :size] = 1.0
    else:
        m[:, 32 - size:, 32 - size:] = 1.0
    return m


def badnets_pixel_patch(channels: int, family: str, pipeline: Pipeline) -> PixelPatch:
    """The BadNets positions (docs/attacks.md §2) written as pixel value 1.0 (a base pattern)."""
    mask = trigger_mask(channels, family).float()
    return PixelPatch(mask, torch.ones(channels, 32, 32), pipeline)


def poisoned_per_epoch(attack: str, data: ClientDataset, client_id: int, seed: int, prob: float,
                       target: int, trigger: Any) -> ClientDataset:
    """A Bernoulli(prob) share relabelled to the target, stamped with ``trigger`` at each draw."""
    if data.images is None:
        raise AttackConfigError(f"{attack} poisons raw images; put it first among the stages")
    poisoned = torch.from_numpy(poison_draw(len(data.labels),
                                            numpy_stream(seed, f"{attack}-poison", client_id), prob))
    labels = torch.where(poisoned, torch.full_like(data.labels, target), data.labels)
    return ClientDataset(labels=labels, pipeline=data.pipeline, images=data.images,
                         poisoned=poisoned, trigger=trigger)


def context_pipeline(ctx: AttackContext) -> Pipeline:
    """The attackers' data pipeline: the first clean dataset's (colour when there is none)."""
    data = next(iter(ctx.clean_data.values()), None)
    return data.pipeline if data is not None else Pipeline(grey=False)


class PerEpochPoison:
    """Mixin (before ``Attack``) for the attacks whose poisoned data carries ``self.trigger``:
    ``poisoned_per_epoch`` under the attack's name, and the same trigger at test time."""

    name: str
    target: int
    poison_prob: float
    trigger: Any

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        return poisoned_per_epoch(self.name, data, client_id, seed, self.poison_prob, self.target,
                                  self.trigger)

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.trigger.apply if self.trigger is not None else None


class BadNetsPixelPoison(PerEpochPoison):
    """Mixin: the trigger is the BadNets pattern of ``self.family`` as a pixel patch (a base
    pattern, Chameleon and 3DFed), built in ``bind`` for the attackers' pipeline."""

    family: str
    ctx: AttackContext

    def bind(self, ctx: AttackContext) -> None:
        self.ctx = ctx
        pipeline = context_pipeline(ctx)
        self.trigger = badnets_pixel_patch(pipeline.out_channels, self.family, pipeline)


def clean_pixels(clean: dict[int, ClientDataset], limit: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Pipeline]:
    """The attackers' own clean images as [0, 1] pixel tensors (no augmentation) and labels."""
    parts = [d for _, d in sorted(clean.items()) if d.images is not None and len(d) > 0]
    if not parts:
        raise AttackConfigError("the attack needs its clients' clean images")
    pipeline = parts[0].pipeline
    x = torch.cat([to_pixels(d.pipeline.test(d.images), pipeline) for d in parts])
    y = torch.cat([d.labels for d in parts])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y, pipeline


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def local_asr(model: nn.Module, x_pix: torch.Tensor, y: torch.Tensor, target: int,
              trigger_pixels: Callable[[torch.Tensor], torch.Tensor], pipeline: Pipeline,
              batch_size: int = 256) -> float:
    """Share of the non-target samples the model sends to the target once triggered."""
    keep = y != target
    x_pix = x_pix[keep]
    if len(x_pix) == 0:
        return 1.0
    hits = 0
    with torch.no_grad():
        for s in range(0, len(x_pix), batch_size):
            xb = to_normalised(trigger_pixels(x_pix[s:s + batch_size]), pipeline)
            hits += int((model(xb).argmax(1) == target).sum())
    return hits / len(x_pix)


def backdoor_loss(model: nn.Module, x_pix_triggered: torch.Tensor, target: int,
                  pipeline: Pipeline) -> torch.Tensor:
    """ℓ(f(x̃), y_t), mean cross-entropy to the target class."""
    logits = model(to_normalised(x_pix_triggered, pipeline))
    return F.cross_entropy(logits, torch.full((len(logits),), target, dtype=torch.long))


def check(cond: Callable[[], bool], attack: str, option: str, allowed: str, value: Any) -> None:
    """Raise ``AttackConfigError`` naming the option and what is allowed (a wrong type included)."""
    try:
        ok = bool(cond())
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AttackConfigError(f"{attack} option {option} must be {allowed}, got {value!r}")


def check_poison_options(attack: str, target: Any, poison_prob: Any) -> None:
    """The options every data-poisoning pixel attack shares: the target class and the
    Bernoulli share of poisoned samples."""
    check(lambda: isinstance(target, int) and target >= 0, attack, "target", "an int ≥ 0", target)
    check(lambda: 0.0 <= poison_prob <= 1.0, attack, "poison_prob", "in [0, 1]", poison_prob)


def frozen_copy(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients (load its weights first: ``load_flat`` writes trainable ones only)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
