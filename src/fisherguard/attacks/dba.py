"""DBA: colluding attackers each stamp one piece of the global trigger (docs/attacks.md §3.1)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fisherguard.attacks.badnets import (CHANNELS, TRIGGER_COLS, TRIGGER_ROWS, BadNets, Trigger,
                                         trigger_mask)
from fisherguard.attacks.base import Attack, AttackConfigError
from fisherguard.clients.training import ClientDataset

SPLITS = ("spatial", "channel")


def trigger_entries(channels: int = 3, family: str = "fdcr", split: str = "spatial"
                    ) -> list[tuple[int, int, int]]:
    """The trigger's (channel, row, col) entries in cutting order.

    ``spatial``: the 12 positions row-major, each carrying every stamped channel; ``channel``:
    the channel-major list of all stamped entries (36 for ``fdcr``).
    """
    if family not in CHANNELS:
        raise AttackConfigError(f"dba family must be one of {', '.join(sorted(CHANNELS))}, "
                                f"got {family!r}")
    chans = [c for c in CHANNELS[family] if c < channels]
    positions = [(r, c) for r in TRIGGER_ROWS for c in TRIGGER_COLS]
    return [(ch, r, c) for ch in chans for r, c in positions]


def piece_masks(channels: int = 3, family: str = "fdcr", pieces: int = 4,
                split: str = "spatial", size: int = 32) -> list[torch.Tensor]:
    """The trigger cut into ``pieces`` near-equal chunks (boolean (C, size, size) masks).

    ``spatial`` cuts the 12 positions row-major (4 pieces: row 0 cols 0–2, row 0 cols 4–6,
    row 2 cols 0–2, row 2 cols 4–6), each piece on all the family's channels; ``channel`` cuts
    the channel-major entry list (3 pieces on ``fdcr``: one colour channel each).
    """
    if split not in SPLITS:
        raise AttackConfigError(f"dba split must be one of {', '.join(SPLITS)}, got {split!r}")
    entries = trigger_entries(channels, family, split)
    units: list[list[tuple[int, int, int]]]
    if split == "spatial":
        chans = sorted({ch for ch, _, _ in entries})
        units = [[(ch, r, c) for ch in chans] for r in TRIGGER_ROWS for c in TRIGGER_COLS]
    else:
        units = [[e] for e in entries]
    if not isinstance(pieces, int) or isinstance(pieces, bool) or not 1 <= pieces <= len(units):
        raise AttackConfigError(f"dba pieces must be an integer in 1..{len(units)} for split "
                                f"{split!r}, got {pieces!r}")
    masks = []
    for chunk in np.array_split(np.arange(len(units)), pieces):
        m = torch.zeros(channels, size, size, dtype=torch.bool)
        for i in chunk:
            for ch, r, c in units[int(i)]:
                m[ch, r, c] = True
        masks.append(m)
    return masks


class DBA(Attack):
    """DBA, attacker j stamps trigger piece j mod M, the test uses the full trigger (Xie et al., ICLR 2020; docs/attacks.md §3.1)."""

    name = "dba"
    paper = "Xie, Huang, Chen, Li, ICLR 2020"
    summary = "data poisoning, colluding: each attacker stamps one piece of the 2x6 trigger (round-robin)"
    kind = "data poisoning"
    knowledge = "colluding"  # the attackers agree on the global trigger and their pieces

    def __init__(self, *, pieces: int = 4, split: str = "spatial", channels: int = 3,
                 family: str = "fdcr", target: int = 2, poison_prob: float = 0.5,
                 augmentation: str = "frozen") -> None:
        self.masks = piece_masks(channels, family, pieces, split)
        # one BadNets stamper per piece: the same Bernoulli draw, relabelling and augmentation rule
        self.stampers = []
        for m in self.masks:
            b = BadNets(channels=channels, family=family, target=target, poison_prob=poison_prob,
                        augmentation=augmentation)
            b.trigger = Trigger(m)
            self.stampers.append(b)
        self.pieces, self.split = pieces, split
        self.channels, self.family, self.target = channels, family, target
        self.poison_prob, self.augmentation = poison_prob, augmentation
        self.trigger = Trigger(trigger_mask(channels, family))

    def piece_of(self, client_id: int) -> int:
        """The piece an attacker stamps: its rank among the attackers, modulo the piece count."""
        rank = sorted(self.ctx.attackers).index(client_id)
        return rank % len(self.masks)

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        return self.stampers[self.piece_of(client_id)].poison(client_id, data, seed)

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.trigger.apply
