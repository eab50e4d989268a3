"""BadNets (Gu et al. 2017) in the papers' setting (docs/protocol.md §5, docs/attacks.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fisherguard.attacks.base import Attack, AttackConfigError
from fisherguard.clients.training import ClientDataset
from fisherguard.seeding import numpy_stream, torch_stream

TRIGGER_ROWS = (0, 2)
TRIGGER_COLS = (0, 1, 2, 4, 5, 6)
TRIGGER_VALUE = 1.0
CHANNELS = {"fdcr": (0, 1, 2), "sdfc": (0,)}


def trigger_mask(channels: int = 3, family: str = "fdcr", size: int = 32) -> torch.Tensor:
    """Boolean (C, size, size) mask: rows {0,2} × cols {0,1,2,4,5,6} on the family's channels."""
    if family not in CHANNELS:
        raise ValueError(f"family must be one of {sorted(CHANNELS)}, got {family!r}")
    m = torch.zeros(channels, size, size, dtype=torch.bool)
    for c in CHANNELS[family]:
        if c < channels:
            for r in TRIGGER_ROWS:
                m[c, r, list(TRIGGER_COLS)] = True
    return m


def stamp(x: torch.Tensor, mask: torch.Tensor, value: float = TRIGGER_VALUE) -> torch.Tensor:
    """x̃ = (1 − m) ⊙ x + m ⊙ Φ on normalised tensors (N, C, H, W); returns a new tensor."""
    return torch.where(mask, torch.full_like(x, value), x)


def poison_draw(n: int, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
    """Which of an attacker's n samples carry the trigger: one Bernoulli(prob) per sample and run."""
    return rng.random(n) < prob


@dataclass(frozen=True)
class Trigger:
    """A fixed pattern written into normalised images (what a poisoned client and the ASR use)."""

    mask: torch.Tensor  # bool (C, 32, 32)
    value: float = TRIGGER_VALUE

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return stamp(x, self.mask, self.value)

    @property
    def channel_uniform(self) -> bool:
        """True when every channel carries the same pattern (grey inputs stay grey)."""
        m = self.mask
        return all(torch.equal(m[0], m[c]) for c in range(1, m.shape[0]))


class BadNets(Attack):
    """Stamp the 2×6 trigger on a Bernoulli(p) share of an attacker's samples, relabel to the target."""

    name = "badnets"
    paper = "Gu et al., arXiv 2017 / IEEE Access 2019"
    summary = "data poisoning: fixed top-left trigger, label flipped to the target"
    kind = "data poisoning"
    knowledge = "data-only"

    def __init__(self, *, channels: int = 3, family: str = "fdcr", target: int = 2,
                 poison_prob: float = 0.5, augmentation: str = "frozen") -> None:
        if augmentation not in ("frozen", "per_epoch"):
            raise AttackConfigError(f"badnets augmentation must be 'frozen' or 'per_epoch', "
                                    f"got {augmentation!r}")
        self.channels, self.family = channels, family
        self.trigger = Trigger(trigger_mask(channels, family))
        self.target, self.poison_prob, self.augmentation = target, poison_prob, augmentation

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        if data.images is None:
            raise AttackConfigError("badnets poisons raw images; put it first among the stages")
        labels = data.labels
        poisoned = torch.from_numpy(poison_draw(len(labels), numpy_stream(seed, "poison", client_id),
                                                self.poison_prob))
        labels = torch.where(poisoned, torch.full_like(labels, self.target), labels)
        cd = ClientDataset(labels=labels, pipeline=data.pipeline, images=data.images,
                           poisoned=poisoned, trigger=self.trigger)
        if self.augmentation == "frozen":
            # the release transforms each attacker sample once and trains on it all run (docs/protocol.md §5.5)
            idx = torch.arange(len(labels))
            frozen = cd.batch(idx, torch_stream(seed, "attacker-augmentation", client_id))[0]
            cd = ClientDataset(labels=labels, pipeline=data.pipeline, frozen=frozen.contiguous())
        return cd

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.trigger.apply
