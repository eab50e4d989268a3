"""Attacks by name, and the one place that builds a run's attack plan from its config."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from fisherguard.attacks.badnets import Trigger, trigger_mask
from fisherguard.attacks.base import Attack, AttackConfigError, NoAttack
from fisherguard.attacks.plan import AttackPlan, Schedule


def _discover() -> dict[str, type[Attack]]:
    """Every named ``Attack`` subclass of the modules in this package, by its config name."""
    import fisherguard.attacks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry",):
            importlib.import_module(f"fisherguard.attacks.{mod.name}")
    found: dict[str, type[Attack]] = {}
    stack = list(Attack.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        # unnamed classes (the plan, mixins) and a test's own subclasses are not in the catalogue
        if not cls.name or not cls.__module__.startswith("fisherguard.attacks"):
            continue
        if cls.name in found and found[cls.name] is not cls:
            raise RuntimeError(f"two attacks are named {cls.name!r}")
        found[cls.name] = cls
    return found


# every attack class, by its config name (``attack.name``; stages joined with "+")
ATTACKS: dict[str, type[Attack]] = _discover()


def available() -> dict[str, type[Attack]]:
    """Name → class, sorted by name."""
    return dict(sorted(ATTACKS.items()))


def get(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise AttackConfigError(f"unknown attack {name!r}; available: {', '.join(available())}")
    return ATTACKS[name]


def build(name: str, options: Mapping[str, Any] | None = None,
          facts: Mapping[str, Any] | None = None) -> Attack:
    """One stage by name; ``facts`` (run settings) fill the options the stage accepts and lacks."""
    cls = get(name)
    allowed = cls.options()
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise AttackConfigError(f"attack {name!r} has no option {', '.join(map(repr, unknown))}; "
                                f"allowed: {', '.join(allowed) or '(none)'}")
    for key, val in (facts or {}).items():
        if key in allowed and key not in opts:
            opts[key] = val
    return cls(**opts)


def stage_names(name: str) -> list[str]:
    """``"badnets+pgd"`` → ``["badnets", "pgd"]``."""
    return [n.strip() for n in name.split("+")]


def from_config(cfg: Any) -> AttackPlan:
    """The attack plan of a resolved config (``fisherguard.config.Config``)."""
    a = cfg.attack
    pattern = {"channels": cfg.data.channels, "family": cfg.experiment.family}
    names = stage_names(a.name)
    if names == ["none"]:
        stage: Attack = NoAttack(control_trigger=Trigger(trigger_mask(**pattern)).apply)
        return AttackPlan([stage])
    if "none" in names or len(set(names)) != len(names):
        raise AttackConfigError(f"attack.name {a.name!r}: stages must be distinct and not 'none'")
    # run settings a stage takes when it has the option (edge-case: its dataset preset and the
    # cross tail's data root, docs/attacks.md §3.6)
    facts = {**pattern, "target": a.target, "poison_prob": a.poison_prob,
             "augmentation": a.augmentation, "dataset": cfg.data.dataset,
             "data_dir": cfg.data.data_dir}
    opts = dict(a.options)
    if len(names) == 1:
        per_stage = {names[0]: opts}
    else:  # composed: options are keyed by stage name
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise AttackConfigError(f"attack.options of a composed attack are keyed by stage "
                                    f"({', '.join(names)}), got {', '.join(map(repr, unknown))}")
        bad = [k for k, v in opts.items() if not isinstance(v, Mapping)]
        if bad:
            raise AttackConfigError(f"attack.options.{bad[0]}: expected a mapping of options")
        per_stage = {n: dict(opts.get(n) or {}) for n in names}
    stages = [build(n, per_stage[n], facts) for n in names]
    schedule = Schedule(a.schedule, a.start, a.end, a.every)
    return AttackPlan(stages, schedule, follow_protocol=a.follow_protocol)


def register(cls: type[Attack]) -> type[Attack]:
    """Add an attack class of your own to the catalogue (usable as a class decorator)."""
    if not cls.name or cls.name in ("none",) or "+" in cls.name:
        raise AttackConfigError(f"an attack needs a name without '+' other than 'none', got {cls.name!r}")
    if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
        raise AttackConfigError(f"an attack named {cls.name!r} exists already")
    ATTACKS[cls.name] = cls
    return cls
