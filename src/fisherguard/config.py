"""Experiment configs: typed, frozen sections with defaults, presets and errors that name the key.

A config is read from YAML (a mapping of sections) and resolved into a ``Config``: one frozen
dataclass per section, every field with its type, default and (where it matters) allowed values.
An unknown key, a wrong type or an impossible value raises ``ConfigError`` naming the dotted key
and what is allowed. ``variants`` (optional; or a ``matrix`` of rows × columns) lists labelled
overrides that are run one after another and reported in one table.

Frozen dataclasses rather than pydantic: the schema is small and flat, the standard library keeps
the core's dependencies to torch/numpy/yaml, and the field annotations are the schema (types,
nullability) so nothing is declared twice.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fisherguard import results as _results


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _fraction(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _share(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _probability(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _label(v: Any) -> str | None:
    return None if 0 <= v < 10 else "must be a class index in 0..9"


def _at_least_one(v: Any) -> str | None:
    return None if v >= 1 else "must be >= 1 (or null)"


def _at_least_two(v: Any) -> str | None:
    return None if v >= 2 else "must be >= 2"


def setting(default: Any = None, *, choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None,
            check: Callable[[Any], str | None] | None = None, help: str = "") -> Any:
    """A config field: its default, allowed values (or a function returning them) and a range check."""
    meta = {"choices": choices, "check": check, "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: FrozenDict(default), metadata=meta)
    return field(default=default, metadata=meta)


class FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes (a frozen section's mapping value, e.g. ``defense.options``)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config values are frozen; use Config.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> "FrozenDict":
        return FrozenDict(copy.deepcopy(dict(self), memo))


def _dataset_names() -> tuple[str, ...]:
    from fisherguard.data.catalogue import DATASET_NAMES

    return DATASET_NAMES


def _trainer_names() -> tuple[str, ...]:
    from fisherguard.clients.trainers import TRAINERS

    return TRAINERS


def _attack_stages(v: Any) -> str | None:
    from fisherguard.attacks.registry import ATTACKS, stage_names

    unknown = [n for n in stage_names(v) if n not in ATTACKS]
    if unknown:
        return f"unknown attack {unknown[0]!r}; choose from {', '.join(sorted(ATTACKS))}"
    return None


def _schedules() -> tuple[str, ...]:
    from fisherguard.attacks.plan import SCHEDULES

    return SCHEDULES


PRESETS_BY_NAME: dict[str, dict[str, Any]] = {
    "paper": {"server.val_size": 256, "server.transform": "test"},
    "code": {"server.val_size": None, "server.transform": "train"},
}


# Keys added after runs were already made, with the value every run made before the key existed
# used. A ``config.yaml`` without such a key is read with this value (``results._results_part``),
# so resuming such a run under a config that resolves the key differently is refused with a
# message naming the key, instead of silently continuing with other behaviour; runs are named
# and matched without keys at these values (``results.identity_part``), so older runs keep their
# names.
LEGACY_VALUES: dict[str, Any] = {
    "experiment.streams": "shared",  # issue 20: every defense seeded with the bare run seed
    "partition.stream": "named",  # issue 20: `code` partitioned from the named stream too
    "federation.fisher_data": "plain",  # issue 20: `code` clients' Fisher without augmentation
    "server.root_set": "U",  # issue 20: `code` FLTrust and Sageflow read U too
    "server.count_cap": 5.0,  # issue 15: the bound, fixed at 5 before it could be set
    "federation.fraction": 1.0,  # issue 18: every client took part in every round
    "federation.clients_per_round": None,  # issue 18
    "federation.attackers_always": False,  # issue 18
}


def _identity_rule(cfg: dict[str, Any]) -> dict[str, Any]:
    """How a run's config.yaml is compared (``results._results_part``): a key it lacks gets its
    ``LEGACY_VALUES`` value; ``experiment.streams`` is left out when the run's defense draws no
    random numbers of its own, ``federation.fisher_data`` when it asks for no client Fisher (they
    cannot change such a run)."""
    for dotted, value in LEGACY_VALUES.items():
        sec, key = dotted.split(".")
        if isinstance(cfg.get(sec), dict):
            cfg[sec].setdefault(key, value)
    randomness, fisher, root_set = _defense_uses(cfg)
    if isinstance(cfg.get("experiment"), dict) and not randomness:
        cfg["experiment"].pop("streams", None)
    if isinstance(cfg.get("federation"), dict) and not fisher:
        cfg["federation"].pop("fisher_data", None)
    if isinstance(cfg.get("server"), dict) and not root_set:
        cfg["server"].pop("root_set", None)
    return cfg


def _defense_uses(cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Whether the config's defense draws random numbers, asks the clients for their Fisher,
    and reads the root set (each true when that cannot be decided)."""
    import json

    try:
        return _defense_uses_cached(json.dumps(cfg, sort_keys=True))
    except TypeError:
        return True, True, True


@functools.lru_cache(maxsize=4096)
def _defense_uses_cached(cfg_json: str) -> tuple[bool, bool, bool]:
    import json

    try:
        d = resolve(json.loads(cfg_json)).build_defense()
    except Exception:  # noqa: BLE001 - an old or odd config: keep the keys
        return True, True, True
    return bool(d.draws_randomness()), bool(d.needs_fisher), bool(d.reads_root_set)


CODE_T100 = ("fashion-mnist", "cifar10", "usps")  # `code`, family fdcr: T = 100 (docs/protocol.md §4)


def preset_values(preset: str, *, family: Any = "fdcr", dataset: Any = "fashion-mnist") -> dict[str, Any]:
    """The config values a preset sets where the user sets none (docs/protocol.md §8).

    Some depend on the family and the dataset (the released FDCR configs' T, the SDFC release's
    CIFAR-10 augmentation on U); a value the user sets always wins.
    """
    out = dict(PRESETS_BY_NAME.get(preset, {}))
    code = preset == "code"
    out["partition.stream"] = "legacy-global" if code else "named"
    # the released FDCR configs train 100 rounds (the 50 commented out), MNIST aside
    # (docs/protocol.md §4, docs/protocol.md §8)
    out["federation.rounds"] = 100 if code and family == "fdcr" and dataset in CODE_T100 else 50
    out["federation.fisher_data"] = "train_loader" if code else "plain"
    out["server.root_set"] = "mnist-5000" if code else "U"
    if code and family == "sdfc" and dataset == "cifar10":
        out["server.transform"] = "strong"  # the SDFC release's CIFAR-10 U, docs/protocol.md §1.3
    return out


@dataclass(frozen=True)
class Experiment:
    name: str = setting("experiment")
    seed: int = setting(0, check=_non_negative)
    preset: str = setting("paper", choices=tuple(PRESETS_BY_NAME),
                          help="paper: the papers' text; code: the released code's behaviour")
    family: str = setting("fdcr", choices=("fdcr", "sdfc"),
                          help="trigger channels: fdcr = all three, sdfc = channel 0")
    streams: str = setting("named", choices=("named", "shared"),
                           help="a defense's own randomness: named = one stream per consumer from "
                                "(seed, name); shared = the bare run seed (runs before issue 20)")


@dataclass(frozen=True)
class Data:
    dataset: str = setting("fashion-mnist", choices=_dataset_names)
    data_dir: str | None = setting(None, help="data root; default FISHERGUARD_DATA or the cache")
    channels: int = setting(3, choices=(1, 3), help="1 = the grey-only project variant")
    train_subset: int | None = setting(None, check=_positive,
                                       help="use only the first N images of the client pool (quick runs)")
    test_subset: int | None = setting(None, check=_positive,
                                      help="evaluate on the first N test images only (quick runs)")
    synthetic_train: int = setting(3000, check=_positive)
    synthetic_test: int = setting(1000, check=_positive)


@dataclass(frozen=True)
class Partition:
    beta: float = setting(0.5, check=_non_negative, help="Dirichlet concentration; 0 = iid")
    min_size: int = setting(10, check=_positive)
    stream: str = setting("named", choices=("named", "legacy-global"),
                          help="paper: the partition's own named stream; code: the released "
                               "code's call order on NumPy's legacy global generator")


@dataclass(frozen=True)
class Federation:
    clients: int = setting(10, check=_at_least_two)
    rounds: int = setting(50, check=_positive)
    local_epochs: int = setting(10, check=_positive)
    batch_size: int = setting(64, check=_positive)
    lr: float = setting(0.01, check=_positive)
    momentum: float = setting(0.9, check=_probability)
    weight_decay: float = setting(1e-5, check=_non_negative)
    fisher_data: str = setting("plain", choices=("plain", "train_loader"),
                               help="a client's Fisher: plain = every sample, no augmentation "
                                    "(paper); train_loader = the augmented training loader (code)")
    # client sampling (issue 18, fisherguard.sampling): m clients a round, from a named stream
    fraction: float = setting(1.0, check=_share, help="share of the K clients sampled each round "
                                                      "(1 = every client, no draw)")
    clients_per_round: int | None = setting(None, check=_positive,
                                            help="clients sampled each round; wins over fraction")
    attackers_always: bool = setting(False, help="worst case: every attacker is among each "
                                                 "round's sampled clients")


@dataclass(frozen=True)
class Attack:
    name: str = setting("badnets", check=_attack_stages,
                        help="an attack, or stages joined by '+' (badnets+pgd); none = no attacker")
    options: Mapping[str, Any] = setting({}, help="the attack's options (keyed by stage when "
                                                   "composed)")
    fraction: float = setting(0.3, check=_fraction, help="share of malicious clients Υ")
    attackers: str = setting("last", choices=("last", "random"))
    target: int = setting(2, check=_label)
    poison_prob: float = setting(0.5, check=_probability)
    augmentation: str = setting("frozen", choices=("frozen", "per_epoch"))
    schedule: str = setting("multi-shot", choices=_schedules,
                            help="multi-shot (every round), single-shot (round start), window "
                                 "[start, end], every (every k-th round from start)")
    start: int | None = setting(None, check=_positive, help="first (or only) attack round, from 1")
    end: int | None = setting(None, check=_positive, help="last attack round (inclusive)")
    every: int | None = setting(None, check=_positive, help="k of the `every` schedule")
    follow_protocol: bool = setting(True, help="attackers apply the defense's client-side terms "
                                               "(SDFC's FDReg, RSA's L1 pull)")


@dataclass(frozen=True)
class Defense:
    name: str = setting("fedavg")
    options: Mapping[str, Any] = setting({})


@dataclass(frozen=True)
class Server:
    val_size: int | None = setting(None, check=_positive,
                                   help="|U|; paper 256, code: the whole validation pool (null)")
    root_set: str = setting("U", choices=("U", "mnist-5000"),
                            help="FLTrust's and Sageflow's server data: U (paper) or 5 000 random "
                                 "MNIST training images whatever the task (code; baselines C5)")
    count_cap: float | None = setting(5.0, check=_at_least_one, help="claimed sample counts above count_cap × the round's lower median are "
                        "clipped to it (docs/algorithms.md §8.3); null turns the bound off")
    transform: str | None = setting(None, choices=("test", "train", "strong"),
                                    help="transform on U; paper: test, code: train (sdfc family "
                                         "on CIFAR-10: strong)")


@dataclass(frozen=True)
class Eval:
    batch_size: int = setting(1000, check=_positive)


@dataclass(frozen=True)
class Runtime:
    # the in-process engine computes on one thread per process whatever this says (numbers never
    # depend on it); kept so that older configs load
    threads: int | None = setting(None, check=_positive)
    engine: str = setting("inprocess", choices=("inprocess", "flower-sim", "flower-deployment"),
                          help="inprocess: this process; flower-sim: Flower's simulation engine; "
                               "flower-deployment: set by a `flwr run` against SuperNodes")
    # the grouped fast path is the default; sequential is the readable reference
    trainer: str = setting("auto", choices=_trainer_names)
    workers: int | None = setting(None, check=_positive,
                                  help="one-thread processes training whole groups side by side; "
                                       "null: one per usable core, at most one per group; "
                                       "never changes the numbers")
    group_size: int = setting(10, check=_positive,
                              help="clients per grouped-convolution ensemble; changes float "
                                   "rounding, so a resume must keep it")
    retain_memory: bool = setting(True, help="keep freed tensor memory in the process (glibc) so "
                                             "training steps do not page-fault; numbers unchanged")


@dataclass(frozen=True)
class Config:
    """A resolved experiment: every section typed and frozen (``replace`` makes a changed copy)."""

    experiment: Experiment
    data: Data
    partition: Partition
    federation: Federation
    attack: Attack
    defense: Defense
    server: Server
    eval: Eval
    runtime: Runtime

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dicts in schema order (the YAML that ``config.yaml`` holds)."""
        return {sec: {f.name: _plain(getattr(getattr(self, sec), f.name))
                      for f in dataclasses.fields(getattr(self, sec))} for sec in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, changes: Mapping[str, Any] | None = None, **dotted: Any) -> "Config":
        """A validated copy with ``section.key`` values changed (``{"experiment.seed": 1}``)."""
        return resolve(apply_overrides(self.to_dict(), {**dict(changes or {}), **dotted}))

    @property
    def attack_fraction(self) -> float:
        """Υ in force: 0 when no attack is configured."""
        return self.attack.fraction if self.attack.name != "none" else 0.0

    @property
    def clients_per_round(self) -> int:
        """m, the clients a round samples (K without sampling; ``fisherguard.sampling``)."""
        from fisherguard.sampling import sampled_count

        f = self.federation
        return sampled_count(f.clients, f.fraction, f.clients_per_round)

    @property
    def sampling(self) -> bool:
        """Whether rounds sample fewer than the K clients."""
        return self.clients_per_round < self.federation.clients

    @property
    def assumed_attackers(self) -> int:
        """f handed to the rules that need one: ⌊K·Υ⌋ without sampling, else the count expected
        among the m sampled clients (every attacker under ``attackers_always``)."""
        from fisherguard.attacks.base import num_attackers
        from fisherguard.sampling import expected_attackers

        k = self.federation.clients
        return expected_attackers(k, num_attackers(k, self.attack_fraction), self.clients_per_round,
                                  attackers_always=self.federation.attackers_always)

    def defense_options(self) -> dict[str, Any]:
        """The defense's options: those given plus the run facts it accepts (preset, seed, assumed f)."""
        import inspect

        from fisherguard.defenses import registry

        params = inspect.signature(registry.get(self.defense.name).__init__).parameters
        opts = dict(self.defense.options)
        facts = {"preset": self.experiment.preset, "seed": self.experiment.seed,
                 "streams": self.experiment.streams,
                 "assumed_attackers": self.assumed_attackers}
        for key, val in facts.items():
            if key in params and key not in opts:
                opts[key] = val
        return opts

    def build_attack(self) -> Any:
        """The run's attack plan (``fisherguard.attacks.plan.AttackPlan``)."""
        from fisherguard.attacks.registry import from_config

        return from_config(self)

    def build_defense(self) -> Any:
        """The run's defense object (``fisherguard.defenses``), built from ``defense_options``."""
        from fisherguard.defenses import registry

        return registry.build(self.defense.name, self.defense_options())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name → its dataclass, in order


def _plain(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else v


@dataclass(frozen=True)
class Key:
    """One field's rules, read off its section dataclass."""

    types: tuple[type, ...]
    nullable: bool
    default: Any
    choices: tuple[Any, ...] | None
    check: Callable[[Any], str | None] | None
    help: str


def _key(section: type, f: dataclasses.Field) -> Key:  # type: ignore[type-arg]
    hint = typing.get_type_hints(section)[f.name]
    args = typing.get_args(hint)
    nullable = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if nullable else hint
    base = typing.get_origin(base) or base
    kinds: tuple[type, ...] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(
        base, (dict,))  # type: ignore[arg-type]
    choices = f.metadata.get("choices")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return Key(kinds, nullable, default, choices() if callable(choices) else choices,
               f.metadata.get("check"), f.metadata.get("help", ""))


@functools.cache
def schema() -> dict[str, dict[str, Key]]:
    """Section → key → its rules, in schema order (read once: type hints are slow to evaluate)."""
    return {sec: {f.name: _key(cls, f) for f in dataclasses.fields(cls)} for sec, cls in SECTIONS.items()}


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(_plain(key.default)) for k, key in keys.items()}
            for sec, keys in schema().items()}


def _type_name(types_: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "mapping"}
    if float in types_:  # an integer is a number too
        types_ = tuple(t for t in types_ if t is not int)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types_))


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


def resolve(raw: Mapping[str, Any] | Config) -> Config:
    """Validate a (partial) config mapping and return the full, frozen config, presets applied."""
    if isinstance(raw, Config):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    rules = schema()
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("defense"), str):
        raw["defense"] = {"name": raw["defense"]}
    if isinstance(raw.get("defense"), dict):
        d = raw["defense"]
        extra = {k: d.pop(k) for k in list(d) if k not in rules["defense"]}
        if extra:  # `defense: {name: fdcr, min_silhouette: 0.8}` is shorthand for options
            d.setdefault("options", {})
            if not isinstance(d["options"], dict):
                raise ConfigError("defense.options: expected mapping")
            d["options"] = {**extra, **d["options"]}
    unknown = sorted(set(raw) - set(rules) - {"variants", "matrix"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed: {', '.join(rules)}, variants, "
                          "matrix")
    for sec, values in raw.items():
        if sec not in ("variants", "matrix") and values is not None and not isinstance(values, dict):
            raise ConfigError(f"{sec}: expected a mapping of keys, got {values!r}")
    part = raw.get("partition") or {}
    if part.get("beta") == "iid":  # docs/protocol.md §3 alias
        part["beta"] = 0.0
    cfg = defaults()
    exp, data = raw.get("experiment") or {}, raw.get("data") or {}
    preset = exp.get("preset", "paper")
    if isinstance(preset, str) and preset in PRESETS_BY_NAME:
        for dotted, v in preset_values(preset, family=exp.get("family", cfg["experiment"]["family"]),
                                       dataset=data.get("dataset", cfg["data"]["dataset"])).items():
            sec, k = dotted.split(".")
            cfg[sec][k] = v
    for sec, values in raw.items():
        if sec in ("variants", "matrix") or values is None:
            continue
        for k, v in values.items():
            if k not in rules[sec]:
                raise ConfigError(f"unknown key {sec}.{k}; allowed in {sec}: {', '.join(rules[sec])}")
            cfg[sec][k] = v
    _edge_case_target(cfg, raw)
    for sec, keys in rules.items():
        for k, key in keys.items():
            cfg[sec][k] = _check_value(f"{sec}.{k}", key, cfg[sec][k])
    out = Config(**{sec: SECTIONS[sec](**{k: FrozenDict(v) if isinstance(v, dict) else v
                                          for k, v in values.items()})
                    for sec, values in cfg.items()})
    _check_sampling(out)
    _check_attack(out, _check_defense(out))
    return out


def _check_sampling(cfg: Config) -> None:
    f = cfg.federation
    if f.clients_per_round is not None and f.fraction != 1.0:
        raise ConfigError("federation: set fraction or clients_per_round, not both")
    if f.clients_per_round is not None and f.clients_per_round > f.clients:
        raise ConfigError(f"federation.clients_per_round: {f.clients_per_round} is more than the "
                          f"{f.clients} clients")
    if f.attackers_always and cfg.sampling:
        from fisherguard.attacks.base import num_attackers

        a = num_attackers(f.clients, cfg.attack_fraction)
        if a >= cfg.clients_per_round:
            raise ConfigError(f"federation.attackers_always: the {a} attackers do not leave a "
                              f"benign client among the {cfg.clients_per_round} sampled a round")


def _edge_case_target(cfg: dict[str, dict[str, Any]], raw: Mapping[str, Any]) -> None:
    """An edge-case run's ``attack.target`` the user left unset is its dataset's preset (MNIST and
    USPS 1, CIFAR-10 9, else 2; docs/attacks.md §3.6); a value the user sets always wins, and
    ``attack.options.target`` wins over both (it goes to the edge-case stage only)."""
    from fisherguard.attacks.registry import stage_names

    name, dataset = cfg["attack"]["name"], cfg["data"]["dataset"]
    if "target" in (raw.get("attack") or {}) or not isinstance(name, str) \
            or not isinstance(dataset, str) or "edge-case" not in stage_names(name):
        return
    from fisherguard.attacks.edgecase import preset

    cfg["attack"]["target"] = preset(dataset)["target"]


def _check_defense(cfg: Config) -> Any:
    """The config's defense, built once and checked against the round's client count."""
    from fisherguard.defenses.base import DefenseConfigError

    try:
        d = cfg.build_defense()
        d.check_clients(cfg.clients_per_round)
    except DefenseConfigError as e:
        raise ConfigError(f"defense: {e}") from None
    return d


def _check_attack(cfg: Config, d: Any) -> None:
    """Build the attack plan once, so a bad option, a defense ``d`` it cannot run beside or an
    engine it cannot run on stops the run now."""
    from fisherguard.attacks.base import AttackConfigError

    try:
        plan = cfg.build_attack()
    except AttackConfigError as e:
        raise ConfigError(f"attack: {e}") from None
    if plan.needs_server_set and d.needs_fisher and not d.needs_server_data:
        # found in round 1 otherwise, after a round's training (or hours into a campaign)
        raise ConfigError(f"attack: {plan.name!r} reads the server's clean-set Fisher M(U), which "
                          f"defense {cfg.defense.name!r} does not hold (use a defense that reads "
                          "one, e.g. sdfc, or another source)")
    engine = cfg.runtime.engine
    if engine == "flower-deployment" and plan.knowledge == "omniscient":
        raise ConfigError(f"attack: {plan.name!r} is omniscient (it reads the benign clients' "
                          "uploads), which a real deployment cannot give it; run it in process or "
                          "on flower-sim")


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


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | list[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides set (``defense=fdcr`` sets the name)."""
    out = copy.deepcopy(dict(raw))
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    done: dict[tuple[str, ...], str] = {}
    for dotted, value in items:
        parts = dotted.split(".")
        if parts == ["defense"]:
            parts = ["defense", "name"]
        if parts[0] == "defense" and len(parts) == 2 and parts[1] not in ("name", "options"):
            parts = ["defense", "options", parts[1]]
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"cannot set {dotted!r}: expected section.key with a section of "
                              f"{', '.join(SECTIONS)}")
        # a mapping set after one of its own keys would drop that key without a word
        lost = [d for p, d in done.items() if len(p) > len(parts) and p[:len(parts)] == tuple(parts)]
        if lost and isinstance(value, Mapping):
            raise ConfigError(f"{dotted} is set after {lost[0]} and would replace it: put "
                              f"{lost[0]} inside {dotted}, or set {lost[0]} after it")
        done[tuple(parts)] = dotted
        node = out
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "defense":
                node[p] = {"name": node[p]}
            node[p] = dict(node.get(p) or {})  # a plain, writable copy (sections may be frozen)
            node = node[p]
        node[parts[-1]] = value
    return out


@dataclass
class Variant:
    label: str
    config: Config
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
    base = apply_overrides({k: v for k, v in raw.items() if k not in ("variants", "matrix")},
                           overrides or [])
    specs = raw.get("variants")
    if raw.get("matrix") is not None:
        if specs is not None:
            raise ConfigError("a config has either variants or a matrix, not both")
        specs = matrix_variants(raw["matrix"])
    if specs is None:
        cfg = resolve(base)
        return [Variant(cfg.experiment.name, cfg)]
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
    slugs = [_results.slug(v.label) for v in out]
    if len(set(slugs)) != len(slugs):
        raise ConfigError("variants: labels must be unique, also as directory names "
                          f"({', '.join(slugs)})")
    commas = [v.label for v in out if "," in v.label]
    if commas:  # `run --only` could never select it
        raise ConfigError(f"variants: the label {commas[0]!r} contains a comma, which `run --only` "
                          "reads as a separator; use ';' or '/' instead")
    return out


def matrix_variants(matrix: Any) -> list[dict[str, Any]]:
    """``matrix: {rows: [{label, set}], columns: [{label, set}], exclude: [...]}`` as variants
    labelled "row | column" with both overrides (the column's win), column by column, so that a
    long campaign finishes one column (e.g. one defense) before it starts the next. ``exclude``
    (optional) lists cells that cannot run, ``{row: label, columns: [labels], why: text}``."""
    if not isinstance(matrix, dict) or not {"rows", "columns"} <= set(matrix) \
            or set(matrix) - {"rows", "columns", "exclude"}:
        raise ConfigError("matrix: expected {rows: [{label, set}], columns: [{label, set}]} and "
                          "optionally exclude: [{row, columns, why}]")
    parts: dict[str, list[dict[str, Any]]] = {}
    for axis in ("rows", "columns"):
        items = matrix[axis]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"matrix.{axis}: expected a non-empty list of {{label, set}}")
        for i, it in enumerate(items):
            if (not isinstance(it, dict) or set(it) - {"label", "set"} or "label" not in it
                    or not isinstance(it.get("set") or {}, dict)):
                raise ConfigError(f"matrix.{axis}[{i}]: expected {{label: ..., set: {{key: value}}}}, "
                                  f"got {it!r}")
        parts[axis] = items
    skip = _matrix_exclusions(matrix.get("exclude") or [],
                              [str(r["label"]) for r in parts["rows"]],
                              [str(c["label"]) for c in parts["columns"]])
    return [{"label": f"{r['label']} | {c['label']}",
             "set": {**(r.get("set") or {}), **(c.get("set") or {})}}
            for c in parts["columns"] for r in parts["rows"]
            if (str(r["label"]), str(c["label"])) not in skip]


def _matrix_exclusions(exclude: Any, rows: list[str], columns: list[str]) -> set[tuple[str, str]]:
    """The (row, column) cells ``matrix.exclude`` names; every entry says why."""
    if not isinstance(exclude, list):
        raise ConfigError("matrix.exclude: expected a list of {row, columns, why}")
    out = set()
    for i, e in enumerate(exclude):
        if (not isinstance(e, dict) or set(e) != {"row", "columns", "why"}
                or not isinstance(e["columns"], list) or not str(e["why"] or "").strip()):
            raise ConfigError(f"matrix.exclude[{i}]: expected {{row: label, columns: [labels], "
                              f"why: text}}, got {e!r}")
        if str(e["row"]) not in rows:
            raise ConfigError(f"matrix.exclude[{i}]: no row labelled {e['row']!r}")
        for c in e["columns"]:
            if str(c) not in columns:
                raise ConfigError(f"matrix.exclude[{i}]: no column labelled {c!r}")
            out.add((str(e["row"]), str(c)))
    return out


_results.add_identity_rule(_identity_rule, LEGACY_VALUES)


def dump(cfg: Config) -> str:
    return cfg.to_yaml()


@dataclass(frozen=True)
class PresetDifference:
    """One value that the `paper` and `code` presets resolve differently for a config.

    ``key`` is a dotted config key, or ``defense.<name>.<parameter>`` for a hyperparameter the
    defense resolves from the preset. ``pinned`` holds the config's own value when the config
    sets the key (both presets then use it; ``paper``/``code`` are what each would choose).
    """

    key: str
    paper: Any
    code: Any
    pinned: Any = None
    is_pinned: bool = False
    unused: bool = False  # the config's defense never reads this value


def preset_differences(raw: Mapping[str, Any]) -> list[PresetDifference]:
    """Every value of a (partial, unresolved) config that ``paper`` and ``code`` resolve
    differently (docs/protocol.md §8), and every preset choice the config pins itself."""
    resolved = {}
    for preset in ("paper", "code"):
        resolved[preset] = resolve(apply_overrides(raw, {"experiment.preset": preset}))
    paper, code = (resolved[p].to_dict() for p in ("paper", "code"))
    unused = _unused_keys(resolved["paper"])
    out: list[PresetDifference] = []
    for sec, keys in paper.items():
        for k, v in keys.items():
            if (sec, k) != ("experiment", "preset") and code[sec][k] != v:
                out.append(PresetDifference(f"{sec}.{k}", v, code[sec][k],
                                            unused=f"{sec}.{k}" in unused))
    # preset choices the config overrides: the same value under both, but only because it is set
    base = resolved["paper"]
    free = {p: preset_values(p, family=base.experiment.family, dataset=base.data.dataset)
            for p in ("paper", "code")}
    for dotted in free["paper"]:
        sec, k = dotted.split(".")
        given = raw.get(sec) if isinstance(raw.get(sec), dict) else {}
        if k in given and free["paper"][dotted] != free["code"][dotted]:
            out.append(PresetDifference(dotted, free["paper"][dotted], free["code"][dotted],
                                        pinned=paper[sec][k], is_pinned=True))
    out.extend(_defense_differences(resolved["paper"], resolved["code"]))
    return out


def _unused_keys(cfg: Config) -> set[str]:
    """Preset-dependent keys the config's defense never reads (shown as such in the view)."""
    d = cfg.build_defense()
    out = set()
    if not d.needs_server_data:
        out |= {"server.val_size", "server.transform", "server.root_set"}
    if not d.reads_root_set:
        out.add("server.root_set")
    if not d.needs_fisher:
        out.add("federation.fisher_data")
    return out


def _defense_differences(paper: Config, code: Config) -> list[PresetDifference]:
    """The defense's hyperparameters that its constructor resolves from the preset."""
    from fisherguard.defenses import registry

    name = paper.defense.name
    got = {"paper": paper.build_defense().get_params(), "code": code.build_defense().get_params()}
    # what each preset alone would choose (the config's own options left out)
    bare = {}
    for cfg, preset in ((paper, "paper"), (code, "code")):
        facts = cfg.replace({"defense.options": {}}).defense_options()
        bare[preset] = registry.build(name, facts).get_params()
    given = dict(paper.defense.options)
    out = []
    if "preset" in given:  # the defense's own preset, set apart from experiment.preset
        out.append(PresetDifference(f"defense.{name}.preset", "paper", "code",
                                    pinned=given["preset"], is_pinned=True))
    for k, v in got["paper"].items():
        if k in ("preset", "seed"):
            continue
        if got["code"].get(k) != v:
            out.append(PresetDifference(f"defense.{name}.{k}", v, got["code"].get(k)))
        elif k in given and bare["paper"].get(k) != bare["code"].get(k):
            out.append(PresetDifference(f"defense.{name}.{k}", bare["paper"].get(k),
                                        bare["code"].get(k), pinned=v, is_pinned=True))
    return out


def format_preset_differences(diffs: list[PresetDifference], title: str = "") -> str:
    """The presets view: one line per value that differs, then the preset choices the config pins."""

    def show(v: Any) -> str:
        return "null" if v is None else (yaml.safe_dump(v, default_flow_style=True).strip()
                                         .removesuffix("...").strip()
                                         if isinstance(v, dict) else str(v))

    free = [d for d in diffs if not d.is_pinned]
    pinned = [d for d in diffs if d.is_pinned]
    rows = [("key", "paper", "code", "")] + [
        (d.key, show(d.paper), show(d.code), "(not read by this defense)" if d.unused else "")
        for d in free]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [title] if title else []
    lines.append(f"{len(free)} value(s) resolve differently under paper and code:")
    lines += [f"  {a.ljust(w0)}  {b.ljust(w1)}  {c.ljust(w2)}  {n}".rstrip() for a, b, c, n in rows]
    if pinned:
        lines.append("set by the config itself, so the same under both presets "
                     "(paper / code would choose):")
        lines += [f"  {d.key} = {show(d.pinned)}  (paper {show(d.paper)}, code {show(d.code)})"
                  for d in pinned]
    return "\n".join(lines)
