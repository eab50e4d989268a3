"""A run's attack: its stages in order, when they act, and whether attackers follow the protocol.

docs/attacks.md §1: stages compose (e.g. BadNets data + PGD + Neurotoxin), attackers act every
round by default (``multi-shot``) or only at chosen rounds, and apply the defense's client-side
terms (SDFC's FDReg, RSA's L1 pull) unless ``follow_protocol`` is off. In a round where the
attack is idle its clients train on their clean data like everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fisherguard.attacks.base import (KNOWLEDGE, Attack, AttackConfigError, AttackContext, Reserved,
                                      RoundView)
from fisherguard.clients.modifier import Chain, TrainingModifier
from fisherguard.clients.training import ClientDataset, Upload

SCHEDULES = ("multi-shot", "single-shot", "window", "every")


@dataclass(frozen=True)
class Schedule:
    """Which rounds the attack acts in; rounds are counted from 1, as in the round records."""

    mode: str = "multi-shot"
    start: int | None = None  # single-shot: the round; window / every: the first round
    end: int | None = None  # window / every: the last round (inclusive); None = the run's end
    every: int | None = None  # every: act in rounds start, start + k, start + 2k, …

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise AttackConfigError(f"attack.schedule must be one of {', '.join(SCHEDULES)}, "
                                    f"got {self.mode!r}")
        if self.mode == "single-shot" and self.start is None:
            raise AttackConfigError("attack.schedule single-shot needs attack.start (the round)")
        if self.mode == "window" and self.start is None:
            raise AttackConfigError("attack.schedule window needs attack.start (and attack.end)")
        if self.mode == "every" and (self.every is None or self.every < 1):
            raise AttackConfigError("attack.schedule every needs attack.every >= 1")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise AttackConfigError(f"attack.end ({self.end}) is before attack.start ({self.start})")

    def active(self, round_idx: int) -> bool:
        """Whether the attack acts in round ``round_idx`` (0-based, as the engine counts)."""
        r = round_idx + 1
        if self.mode == "multi-shot":
            return True
        if self.mode == "single-shot":
            return r == self.start
        first = self.start or 1
        if r < first or (self.end is not None and r > self.end):
            return False
        return self.mode == "window" or (r - first) % int(self.every or 1) == 0


class AttackPlan(Attack):
    """Stages applied in order; the plan itself is an ``Attack`` the engine drives."""

    def __init__(self, stages: list[Attack], schedule: Schedule | None = None, *,
                 follow_protocol: bool = True) -> None:
        if not stages:
            raise AttackConfigError("an attack needs at least one stage")
        self.stages = list(stages)
        self.schedule = schedule or Schedule()
        # a protocol-breaking stage (fdreg-skip) turns compliance off like the config switch does
        self.follow_protocol = follow_protocol and not any(s.breaks_protocol for s in self.stages)
        self.name = "+".join(s.name for s in self.stages)  # type: ignore[misc]
        self.knowledge = max((s.knowledge for s in self.stages), key=KNOWLEDGE.index)  # type: ignore[misc]
        self.per_client = any(s.per_client for s in self.stages)  # type: ignore[misc]
        self.fisher_at_upload = any(s.fisher_at_upload for s in self.stages)  # type: ignore[misc]
        self.needs_server_set = any(s.needs_server_set for s in self.stages)

    def active(self, round_idx: int) -> bool:
        return self.name != "none" and self.schedule.active(round_idx)

    @property
    def dynamic(self) -> list[str]:
        """Stages that update state from the global model each round (``begin_round``): a
        distributed engine ships their state to the attackers' nodes every round."""
        return [s.name for s in self.stages if type(s).begin_round is not Attack.begin_round]

    def bind(self, ctx: AttackContext) -> None:
        self.ctx = ctx
        for s in self.stages:
            s.bind(ctx)

    def reserve(self, images: torch.Tensor, labels: np.ndarray, pool: np.ndarray,
                seed: int) -> Reserved | None:
        """The one stage's reservation; two stages that both reserve images are an error."""
        found = [(s.name, r) for s in self.stages
                 if (r := s.reserve(images, labels, pool, seed)) is not None]
        if len(found) > 1:
            raise AttackConfigError(f"only one attack stage may reserve images, got "
                                    f"{', '.join(n for n, _ in found)}")
        return found[0][1] if found else None

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        for s in self.stages:
            data = s.poison(client_id, data, seed)
        return data

    def begin_round(self, round_idx: int, global_weights: torch.Tensor) -> None:
        for s in self.stages:
            s.begin_round(round_idx, global_weights)

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        parts = [m for s in self.stages if (m := s.training(client_id, round_idx, start_weights))]
        return None if not parts else parts[0] if len(parts) == 1 else Chain(parts)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        own = view.own
        for s in self.stages:
            omniscient = s.knowledge == "omniscient"
            own = s.after_training(RoundView(view.round_idx, view.global_weights, own,
                                             view.benign if omniscient else None,
                                             view.fisher, view.plans,
                                             view.server_fisher if omniscient else None))
        return own

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        for s in self.stages:
            t = s.test_trigger()
            if t is not None:
                return t
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stages = state.get("stages", [])
        if len(stages) != len(self.stages):
            raise ValueError(f"attack state has {len(stages)} stages, the plan {len(self.stages)}")
        for s, st in zip(self.stages, stages):
            s.load_state_dict(st)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "knowledge": self.knowledge,
                "schedule": vars(self.schedule), "follow_protocol": self.follow_protocol,
                "stages": [s.describe() for s in self.stages]}
