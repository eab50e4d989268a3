"""A client's local optimiser settings (docs/protocol.md §4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainPlan:
    """Local optimiser settings (docs/protocol.md §4): a fresh SGD per client and round."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
