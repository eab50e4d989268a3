"""The attack interface (docs/attacks.md §1): who attacks, then the attack's stages.

An attack poisons its clients' data before the run (``poison``), and may transform the uploads of
its clients after each round's local training (``after_training``). What that stage may read is
bounded by the attack's knowledge level: the benign uploads of the round are handed over only to
an ``omniscient`` attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.data.transforms import Pipeline

# docs/attacks.md §1: what an attacker knows, from least to most
KNOWLEDGE = ("data-only", "model", "colluding", "omniscient")
ATTACKER_CHOICE = ("last", "random")


def num_attackers(num_clients: int, fraction: float) -> int:
    """⌊K·Υ⌋, with Υ held in parts per million so that 0.3·10 cannot floor to 2."""
    return (num_clients * round(fraction * 1e6)) // 1_000_000


def choose_attackers(num_clients: int, fraction: float, *, mode: str = "last",
                     rng: np.random.Generator | None = None) -> list[int]:
    """The last ⌊K·Υ⌋ client ids (docs/protocol.md §5.1), or a seeded random set of that size."""
    count = num_attackers(num_clients, fraction)
    if mode == "last":
        return list(range(num_clients - count, num_clients))
    if mode == "random":
        if rng is None:
            raise ValueError("attackers: random needs a random stream")
        return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))
    raise ValueError(f"attackers must be one of {', '.join(ATTACKER_CHOICE)}, got {mode!r}")


@dataclass
class RoundView:
    """What an attack's after-training stage sees of one round, by its knowledge level."""

    round_idx: int
    global_weights: torch.Tensor
    own: dict[int, Upload]  # the attackers' uploads, by client id (changed in place or replaced)
    benign: dict[int, Upload] | None = None  # only for an omniscient attack


class Attack:
    """Base class: a data-poisoning stage and an (identity) after-training stage."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    knowledge: ClassVar[str] = "data-only"

    def poison(self, client_id: int, images: torch.Tensor, labels: torch.Tensor,
               pipeline: Pipeline, seed: int) -> ClientDataset:
        """An attacker's training data (default: its own data, unchanged)."""
        return ClientDataset(labels=labels, pipeline=pipeline, images=images)

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The map from a normalised test batch to its triggered version (None: no backdoor)."""
        return None

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """The attackers' uploads of this round after the attack's update/upload stage."""
        return view.own

    def round_view(self, round_idx: int, global_weights: torch.Tensor,
                   uploads: dict[int, Upload], attackers: list[int]) -> RoundView:
        """The stage's input: own uploads, plus the benign ones only at the ``omniscient`` level."""
        own = {k: u for k, u in uploads.items() if k in attackers}
        benign = ({k: u for k, u in uploads.items() if k not in attackers}
                  if self.knowledge == "omniscient" else None)
        return RoundView(round_idx, global_weights, own, benign)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "paper": self.paper, "knowledge": self.knowledge}


class NoAttack(Attack):
    """Every client benign (``attack.name: none``); ASR is still measured with a control trigger."""

    name = "none"
    summary = "no attacker (the control trigger measures the backdoor base rate)"

    def __init__(self, *, control_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.control_trigger = control_trigger

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.control_trigger
