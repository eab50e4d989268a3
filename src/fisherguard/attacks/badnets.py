"""BadNets (Gu et al. 2017) in the papers' setting (protocol §5, attacks.md §2)."""

from __future__ import annotations

import numpy as np
import torch

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
