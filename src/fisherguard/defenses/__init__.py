"""Aggregation rules behind one interface (``base.Defense``); ``registry`` finds them by name."""

from fisherguard.defenses.base import (Aggregate, ClientPlan, Defense, DefenseConfigError, PlanInput,
                                       RoundInput, ServerData)

__all__ = ["Aggregate", "ClientPlan", "Defense", "DefenseConfigError", "PlanInput", "RoundInput",
           "ServerData"]
