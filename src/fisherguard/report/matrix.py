"""``fisherguard matrix``: every defense against every attack on a stated budget protocol.

The protocol (docs/results.md §6): USPS, K = 10, β = 0.5, Υ = 30 %, E = 2, T = 20, seed 0 by
default; stages that do not poison data themselves (model poisoning such as PGD or scaling,
upload forgeries, protocol deviations) ride on BadNets' data; the trigger optimisers run at a
stated budget (``BUDGETS``). Runs go through ``reproduce.execute`` (one ``fisherguard run``
subprocess each, keyed by the resolved config, finished runs skipped), and the cells are read
back from the run directories like any other results.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fisherguard.attacks import registry as attacks
from fisherguard.attacks.base import Attack
from fisherguard.config import Config, apply_overrides, resolve
from fisherguard.defenses import registry as defenses
from fisherguard.report.reproduce import PlannedRun, PlanError
from fisherguard.results import identity_part, slug

# docs/results.md §6: what a trigger optimiser may spend per round (their defaults spend minutes)
BUDGETS: dict[str, dict[str, Any]] = {"a3fl": {"trigger_epochs": 5, "adv_epochs": 1},
                                      "iba": {"generator_epochs": 5}}
PROTOCOL: dict[str, Any] = {
    "experiment": {"name": "matrix", "seed": 0, "preset": "paper", "family": "fdcr"},
    "data": {"dataset": "usps"},
    "partition": {"beta": 0.5},
    "federation": {"clients": 10, "rounds": 20, "local_epochs": 2},
    "attack": {"name": "badnets", "fraction": 0.3},
    "runtime": {"threads": 1},
}


def attack_names() -> list[str]:
    """Every shipped attack as it runs in the matrix: a stage that does not poison data itself
    rides on BadNets' data (``badnets+pgd``); Byzantine stages replace the upload alone."""
    out = []
    for name, cls in attacks.available().items():
        if name in ("none", "badnets"):
            continue
        own_data = cls.poison is not Attack.poison or cls.reserve is not Attack.reserve
        out.append(name if own_data or cls.kind == "byzantine" else f"badnets+{name}")
    return ["badnets"] + sorted(out)


def defense_names() -> list[str]:
    """Every shipped defense a user can run honestly (the oracle ablation is not a defense)."""
    names = [n for n, cls in defenses.available().items() if not cls.needs_attacker_ids]
    first = [n for n in ("fedavg", "fdcr", "sdfc") if n in names]  # the reference and the two
    return first + [n for n in names if n not in first]


def config_for(attack: str, defense: str, *, seed: int = 0,
               overrides: list[tuple[str, Any]] | None = None) -> Config:
    """The resolved config of one cell under the matrix protocol."""
    stage = attack.split("+")[-1]
    raw = apply_overrides(PROTOCOL, {"attack.name": attack, "defense": defense,
                                     "experiment.seed": seed})
    if stage in BUDGETS:
        raw = apply_overrides(raw, {"attack.options": dict(BUDGETS[stage])})
    return resolve(apply_overrides(raw, overrides or []))


def plan(*, attacks_: list[str] | None = None, defenses_: list[str] | None = None,
         seeds: list[int] = (0,), out: str | Path = "runs/matrix",
         overrides: list[tuple[str, Any]] | None = None) -> list[PlannedRun]:
    """Every (attack, defense, seed) cell, defense by defense; names are checked first."""
    all_a, all_d = attack_names(), defense_names()
    for what, wanted, have in (("attack", attacks_, all_a), ("defense", defenses_, all_d)):
        bad = [w for w in wanted or [] if w not in have]
        if bad:
            raise PlanError(f"matrix: no {what} {bad[0]!r}; choose from {', '.join(have)}")
    runs = []
    for d in defenses_ or all_d:
        for a in attacks_ or all_a:
            for s in seeds:
                cfg = config_for(a, d, seed=s, overrides=overrides)
                digest = hashlib.sha256(json.dumps(identity_part(cfg.to_yaml()),
                                                   sort_keys=True).encode()).hexdigest()[:10]
                key = f"{slug(a)}-{d}-s{s}-{digest}"
                runs.append(PlannedRun(key, "matrix", d, cfg, Path(out) / key))
    return runs


def protocol_text(runs: list[PlannedRun]) -> str:
    """One line stating the protocol the plan runs (printed with the table)."""
    if not runs:
        return "no runs"
    c = runs[0].config
    return (f"{c.data.dataset}, K = {c.federation.clients}, β = {c.partition.beta:g}, "
            f"Υ = {c.attack.fraction:.0%}, E = {c.federation.local_epochs}, "
            f"T = {c.federation.rounds}; budgets "
            + ", ".join(f"{k} {v}" for k, v in BUDGETS.items()))
