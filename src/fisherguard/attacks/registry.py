"""Attacks by name, and the one place that builds a run's attack from its config."""

from __future__ import annotations

from typing import Any

from fisherguard.attacks.badnets import BadNets, Trigger, trigger_mask
from fisherguard.attacks.base import Attack, NoAttack

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, NoAttack)}


def available() -> dict[str, type[Attack]]:
    """Name → class, sorted by name."""
    return dict(sorted(ATTACKS.items()))


def from_config(cfg: Any) -> Attack:
    """The attack of a resolved config (``fisherguard.config.Config``)."""
    a = cfg.attack
    pattern = {"channels": cfg.data.channels, "family": cfg.experiment.family}
    if a.name == "none":
        return NoAttack(control_trigger=Trigger(trigger_mask(**pattern)).apply)
    if a.name == "badnets":
        return BadNets(**pattern, target=a.target, poison_prob=a.poison_prob,
                       augmentation=a.augmentation)
    raise ValueError(f"unknown attack {a.name!r}; available: {', '.join(available())}")
