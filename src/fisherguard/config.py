"""Experiment configs: a YAML schema with defaults, presets and errors that name the key.

A config is a mapping of sections. Every key has a type, a default and (where it matters) allowed
values; an unknown key, a wrong type or an impossible value raises ``ConfigError`` naming the
dotted key and what is allowed. ``variants`` (optional) lists labelled overrides that are run one
after another and reported in one table.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

# the data room's catalogue is the one list of dataset names (the data room never imports config)
from fisherguard.data.catalogue import DATASET_NAMES


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    nullable: bool = False
    help: str = ""


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _fraction(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _probability(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _label(v: Any) -> str | None:
    return None if 0 <= v < 10 else "must be a class index in 0..9"


INT, FLOAT, STR, BOOL = (int,), (int, float), (str,), (bool,)

SCHEMA: dict[str, dict[str, Key]] = {
    "experiment": {
        "name": Key(STR, "experiment"),
        "seed": Key(INT, 0, check=_non_negative),
        "preset": Key(STR, "paper", choices=("paper", "code"),
                      help="paper: the papers' text; code: the released code's behaviour"),
        "family": Key(STR, "fdcr", choices=("fdcr", "sdfc"),
                      help="trigger channels: fdcr = all three, sdfc = channel 0"),
    },
    "data": {
        "dataset": Key(STR, "fashion-mnist", choices=DATASET_NAMES),
        "data_dir": Key(STR, None, nullable=True, help="data root; default FISHERGUARD_DATA or the cache"),
        "channels": Key(INT, 3, choices=(1, 3), help="1 = the grey-only project variant"),
        "train_subset": Key(INT, None, nullable=True, check=_positive,
                            help="use only the first N images of the client pool (quick runs)"),
        "test_subset": Key(INT, None, nullable=True, check=_positive,
                           help="evaluate on the first N test images only (quick runs)"),
        "synthetic_train": Key(INT, 3000, check=_positive),
        "synthetic_test": Key(INT, 1000, check=_positive),
    },
    "partition": {
        "beta": Key(FLOAT, 0.5, check=_non_negative, help="Dirichlet concentration; 0 = iid"),
        "min_size": Key(INT, 10, check=_positive),
    },
    "federation": {
        "clients": Key(INT, 10, check=lambda v: None if v >= 2 else "must be >= 2"),
        "rounds": Key(INT, 50, check=_positive),
        "local_epochs": Key(INT, 10, check=_positive),
        "batch_size": Key(INT, 64, check=_positive),
        "lr": Key(FLOAT, 0.01, check=_positive),
        "momentum": Key(FLOAT, 0.9, check=_probability),
        "weight_decay": Key(FLOAT, 1e-5, check=_non_negative),
    },
    "attack": {
        "name": Key(STR, "badnets", choices=("badnets", "none")),
        "fraction": Key(FLOAT, 0.3, check=_fraction, help="share of malicious clients Υ"),
        "attackers": Key(STR, "last", choices=("last", "random")),
        "target": Key(INT, 2, check=_label),
        "poison_prob": Key(FLOAT, 0.5, check=_probability),
        "augmentation": Key(STR, "frozen", choices=("frozen", "per_epoch")),
    },
    "defense": {
        "name": Key(STR, "fedavg"),
        "options": Key((dict,), {}),
    },
    "server": {
        "val_size": Key(INT, None, nullable=True, check=_positive,
                        help="|U|; paper 256, code: the whole validation pool (null)"),
        "transform": Key(STR, None, nullable=True, choices=("test", "train"),
                         help="transform on U; paper: test, code: train"),
    },
    "eval": {
        "batch_size": Key(INT, 1000, check=_positive),
    },
    "runtime": {
        "threads": Key(INT, None, nullable=True, check=_positive),
        "engine": Key(STR, "inprocess", choices=("inprocess", "flower-sim", "flower-deployment"),
                      help="inprocess: this process; flower-sim: Flower's simulation engine; "
                           "flower-deployment: set by a `flwr run` against SuperNodes"),
        # the grouped fast path is the default; sequential is the readable reference
        "trainer": Key(STR, "auto", choices=("auto", "grouped", "sequential")),
        "workers": Key(INT, 1, check=_positive),
        "group_size": Key(INT, 10, check=_positive),
        "retain_memory": Key(BOOL, True, help="keep freed tensor memory in the process (glibc) so "
                                              "training steps do not page-fault; numbers unchanged"),
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"server.val_size": 256, "server.transform": "test"},
    "code": {"server.val_size": None, "server.transform": "train"},
}


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(key.default) for k, key in keys.items()}
            for sec, keys in SCHEMA.items()}


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "mapping"}
    if float in types:  # an integer is a number too
        types = tuple(t for t in types if t is not int)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_value(dotted: str, key: Key, value: Any) -> Any:
    if value is None:
        if key.nullable:
            return None
        raise ConfigError(f"{dotted}: must not be empty (expected {_type_name(key.types)})")
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise ConfigError(f"{dotted}: expected {_type_name(key.types)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{dotted}: must be finite, got {value!r}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{dotted}: {value!r} is not allowed; choose one of "
                          f"{', '.join(map(str, key.choices))}")
    if key.check is not None:
        err = key.check(value)
        if err:
            raise ConfigError(f"{dotted}: {err}, got {value!r}")
    return value


def resolve(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a (partial) config mapping and return the full config, presets applied."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("defense"), str):
        raw["defense"] = {"name": raw["defense"]}
    if isinstance(raw.get("defense"), dict):
        d = raw["defense"]
        extra = {k: d.pop(k) for k in list(d) if k not in SCHEMA["defense"]}
        if extra:  # `defense: {name: fdcr, min_silhouette: 0.8}` is shorthand for options
            d.setdefault("options", {})
            if not isinstance(d["options"], dict):
                raise ConfigError("defense.options: expected mapping")
            d["options"] = {**extra, **d["options"]}
    unknown = sorted(set(raw) - set(SCHEMA) - {"variants"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed: {', '.join(SCHEMA)}, variants")
    for sec, values in raw.items():
        if sec != "variants" and values is not None and not isinstance(values, dict):
            raise ConfigError(f"{sec}: expected a mapping of keys, got {values!r}")
    part = raw.get("partition") or {}
    if part.get("beta") == "iid":  # protocol §3 alias
        part["beta"] = 0.0
    cfg = defaults()
    preset = (raw.get("experiment") or {}).get("preset", "paper")
    if isinstance(preset, str) and preset in PRESETS:
        for dotted, v in PRESETS[preset].items():
            sec, k = dotted.split(".")
            cfg[sec][k] = v
    for sec, values in raw.items():
        if sec == "variants":
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{sec}: expected a mapping of keys, got {values!r}")
        for k, v in values.items():
            if k not in SCHEMA[sec]:
                raise ConfigError(f"unknown key {sec}.{k}; allowed in {sec}: {', '.join(SCHEMA[sec])}")
            cfg[sec][k] = v
    for sec, keys in SCHEMA.items():
        for k, key in keys.items():
            cfg[sec][k] = _check_value(f"{sec}.{k}", key, cfg[sec][k])
    _check_defense(cfg)
    return cfg


def _check_defense(cfg: dict[str, dict[str, Any]]) -> None:
    from fisherguard.defenses import registry
    from fisherguard.defenses.base import DefenseConfigError

    name = cfg["defense"]["name"]
    try:
        registry.build(name, _defense_options(cfg)).check_clients(cfg["federation"]["clients"])
    except DefenseConfigError as e:
        raise ConfigError(f"defense: {e}") from None


def _defense_options(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The options given plus the run facts a defense may accept (preset, seed, assumed f)."""
    import inspect

    from fisherguard.data.partition import attacker_ids
    from fisherguard.defenses import registry

    cls = registry.get(cfg["defense"]["name"])
    params = inspect.signature(cls.__init__).parameters
    opts = dict(cfg["defense"]["options"])
    k = cfg["federation"]["clients"]
    frac = cfg["attack"]["fraction"] if cfg["attack"]["name"] != "none" else 0.0
    facts = {"preset": cfg["experiment"]["preset"], "seed": cfg["experiment"]["seed"],
             "assumed_attackers": len(attacker_ids(k, frac))}
    for key, val in facts.items():
        if key in params and key not in opts:
            opts[key] = val
    return opts


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: cannot parse {value!r}: {e}") from None
    return dotted.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides set (``defense=fdcr`` sets the name)."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for dotted, value in items:
        parts = dotted.split(".")
        if parts == ["defense"]:
            parts = ["defense", "name"]
        if parts[0] == "defense" and len(parts) == 2 and parts[1] not in SCHEMA["defense"]:
            parts = ["defense", "options", parts[1]]
        if len(parts) < 2 or parts[0] not in SCHEMA:
            raise ConfigError(f"cannot set {dotted!r}: expected section.key with a section of "
                              f"{', '.join(SCHEMA)}")
        node = out
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "defense":
                node[p] = {"name": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted!r}: {p} is not a mapping")
        node[parts[-1]] = value
    return out


@dataclass
class Variant:
    label: str
    config: dict[str, dict[str, Any]]
    nested: bool = False  # one of a config's labelled variants: results go to a sub-directory


def load(path: str | Path, overrides: list[str] | None = None) -> list[Variant]:
    """Read a YAML config; return its resolved variants (one, unnamed, when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return variants_of(raw, [parse_override(o) for o in overrides or []])


def variants_of(raw: dict[str, Any], overrides: list[tuple[str, Any]] | None = None) -> list[Variant]:
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping of sections")
    base = apply_overrides({k: v for k, v in raw.items() if k != "variants"}, overrides or [])
    specs = raw.get("variants")
    if specs is None:
        cfg = resolve(base)
        return [Variant(cfg["experiment"]["name"], cfg)]
    if not isinstance(specs, list) or not specs:
        raise ConfigError("variants: expected a non-empty list of {label, set} mappings")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) - {"label", "set"} or "label" not in spec:
            raise ConfigError(f"variants[{i}]: expected {{label: ..., set: {{key: value}}}}, got {spec!r}")
        sets = spec.get("set") or {}
        if not isinstance(sets, dict):
            raise ConfigError(f"variants[{i}].set: expected a mapping of section.key: value")
        try:
            # command-line overrides win over the variant's own settings
            cfg = resolve(apply_overrides(apply_overrides(base, sets), overrides or []))
        except ConfigError as e:
            raise ConfigError(f"variants[{i}] ({spec['label']}): {e}") from None
        out.append(Variant(str(spec["label"]), cfg, nested=True))
    from fisherguard.engine.simulator import slug

    slugs = [slug(v.label) for v in out]
    if len(set(slugs)) != len(slugs):
        raise ConfigError("variants: labels must be unique, also as directory names "
                          f"({', '.join(slugs)})")
    return out


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
