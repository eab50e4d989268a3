"""The attack interface (docs/attacks.md §1): who attacks, then the attack's stages.

An attack is a pipeline of optional stages, each a hook of ``Attack`` that changes nothing by
default: ``reserve`` (client-pool images held out of every client before the partition, e.g. an
edge-case tail), ``poison`` (the attacker's training data, before the run), ``begin_round`` (state an
attack updates from the global model, e.g. an optimised trigger), ``training`` (a
``TrainingModifier``: loss terms, gradient masks, projections, optimiser overrides) and
``after_training`` (update transforms and upload forgeries). What the last stage may read is
bounded by the attack's knowledge level: the benign uploads of the round are handed over only to
an ``omniscient`` attack, the other attackers' uploads only from ``colluding`` up.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import ClientDataset, Upload

# docs/attacks.md §1: what an attacker knows, from least to most
KNOWLEDGE = ("data-only", "model", "colluding", "omniscient")
ATTACKER_CHOICE = ("last", "random")
# docs/attacks.md §0: what a stage changes
KINDS = ("data poisoning", "model poisoning", "trigger optimisation", "upload forgery",
         "protocol deviation", "byzantine", "none")


def check_state_keys(attack: str, state: dict[str, Any], keys: Iterable[str]) -> None:
    """A stage's saved state must hold exactly its keys (ValueError naming the stray/missing ones)."""
    if not isinstance(state, dict):
        raise ValueError(f"attack {attack!r}: state must be a dict, got {type(state).__name__}")
    want = set(keys)
    unknown, missing = sorted(set(state) - want), sorted(want - set(state))
    if unknown or missing:
        raise ValueError(f"attack {attack!r}: state has unknown keys {unknown} and lacks {missing}"
                         if unknown and missing else
                         f"attack {attack!r}: unknown state keys {unknown}" if unknown else
                         f"attack {attack!r}: state lacks keys {missing}")


def state_tensor(attack: str, key: str, value: Any, shape: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """A saved tensor, copied; ValueError when it is not a tensor or not of ``shape``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"attack {attack!r}: state {key!r} must be a tensor, "
                         f"got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"attack {attack!r}: state {key!r} has shape {tuple(value.shape)}, "
                         f"expected {tuple(shape)}")
    return value.detach().clone()


class AttackConfigError(ValueError):
    """An attack option is unknown or out of range; the message names it and what is allowed."""


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
class AttackContext:
    """Run facts an attack stage may use: never the defense's state, never benign clients' data."""

    num_clients: int
    attackers: list[int]  # the attack knows its own clients
    seed: int
    target: int
    clean_data: dict[int, ClientDataset] = field(default_factory=dict)  # its clients' own data
    model_factory: Callable[[], torch.nn.Module] | None = None  # the federation's model class
    plan: TrainPlan | None = None  # the benign clients' optimiser settings
    num_classes: int = 10
    # the attackers' part of the images the attack reserved before the partition (``reserve``)
    extra_data: ClientDataset | None = None


@dataclass
class Reserved:
    """Client-pool images an attack takes out of every client's data before the partition."""

    indices: np.ndarray  # training-set indices removed from the client pool (held by no client)
    attacker_images: torch.Tensor  # uint8 (n_a, C, 32, 32): the attackers' part
    attacker_labels: torch.Tensor  # int64 (n_a,), already relabelled (e.g. to the target)
    test_images: torch.Tensor  # uint8 (n_t, C, 32, 32): the held-out part, scored as ASR_edge
    target: int  # the label the held-out part is measured against


# F(D; w) for one of the attack's own clients k at weights w: on its round's training data
# (dataset None) or on the dataset given (e.g. its clean data), with the client's own Fisher
# options and stream, so a forged upload can carry a Fisher computed the way the client would
OwnFisher = Callable[[int, torch.Tensor, "ClientDataset | None"], torch.Tensor]


@dataclass
class RoundView:
    """What an attack's after-training stage sees of one round, by its knowledge level."""

    round_idx: int
    global_weights: torch.Tensor
    own: dict[int, Upload]  # the attackers' uploads, by client id (changed in place or replaced)
    benign: dict[int, Upload] | None = None  # only for an omniscient attack
    # own clients' Fisher (``OwnFisher``); None when the defense reads no Fisher
    fisher: OwnFisher | None = None
    # the defense's plans (``ClientPlan``, e.g. SDFC's FDReg with H_k) sent to the attack's own
    # clients this round: what a client legitimately receives
    plans: dict[int, Any] = field(default_factory=dict)
    # M(U; w), the server set's Fisher: a named oracle, only for an omniscient stage
    server_fisher: Callable[[torch.Tensor], torch.Tensor] | None = None


class Attack:
    """Base class: every stage is the identity; subclasses override the stages they have."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "none"
    knowledge: ClassVar[str] = "data-only"
    # the stage needs its clients trained one by one (it changes their training)
    per_client: ClassVar[bool] = False
    # the upload it crafts carries the honest Fisher of the uploaded model on the attacker's own
    # data (docs/attacks.md §5), recomputed by the engine after ``after_training``
    fisher_at_upload: ClassVar[bool] = False
    # the stage makes its clients skip the defense's client-side term (docs/attacks.md §4.0)
    breaks_protocol: ClassVar[bool] = False
    # the stage reads M(U) of the server's clean set (``RoundView.server_fisher``): it runs only
    # beside a defense that holds one, or one that reads no Fisher (the stage is then a no-op)
    needs_server_set: bool = False

    def bind(self, ctx: AttackContext) -> None:
        """Learn the run's facts once, before ``poison`` (default: keep them)."""
        self.ctx = ctx

    def reserve(self, images: torch.Tensor, labels: np.ndarray, pool: np.ndarray,
                seed: int) -> Reserved | None:
        """Images of the client pool (training-set indices ``pool`` into ``images`` / ``labels``)
        to hold out of every client before the partition, split into the attackers' part and a
        held-out test part (default: none)."""
        return None

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        """An attacker's training data (default: unchanged)."""
        return data

    def begin_round(self, round_idx: int, global_weights: torch.Tensor) -> None:
        """Update per-round state from the global model every client receives (default: none)."""

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        """How an attacker's local training changes this round (default: not at all)."""
        return None

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """The attackers' uploads of this round after the update/upload stage (default: as trained)."""
        return view.own

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The map from a normalised test batch to its triggered version (None: no backdoor)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State carried across rounds (an optimised trigger, the previous global model, …), saved
        in the checkpoint so a resumed run equals an uninterrupted one (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"attack {self.name!r} keeps no state, got keys {sorted(state)}")

    def round_view(self, round_idx: int, global_weights: torch.Tensor,
                   uploads: dict[int, Upload], attackers: list[int], *,
                   fisher: OwnFisher | None = None,
                   plans: dict[int, Any] | None = None,
                   server_fisher: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> RoundView:
        """The stage's input: own uploads, the own clients' Fisher and plans, plus the benign
        uploads and the server set's Fisher (an oracle) only at the ``omniscient`` level."""
        own = {k: u for k, u in uploads.items() if k in attackers}
        benign = ({k: u for k, u in uploads.items() if k not in attackers}
                  if self.knowledge == "omniscient" else None)
        own_plans = {k: p for k, p in (plans or {}).items() if k in attackers}
        omniscient = self.knowledge == "omniscient"
        return RoundView(round_idx, global_weights, own, benign, fisher, own_plans,
                         server_fisher if omniscient else None)

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The constructor's keyword options and their defaults."""
        params = inspect.signature(cls.__init__).parameters
        return {n: p.default for n, p in params.items()
                if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY}

    def get_params(self) -> dict[str, Any]:
        """The options this attack was built with (attribute of the same name)."""
        return {n: getattr(self, n) for n in self.options()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "paper": self.paper, "kind": self.kind,
                "knowledge": self.knowledge, "options": self.get_params()}


class NoAttack(Attack):
    """Every client benign (``attack.name: none``); ASR is still measured with a control trigger."""

    name = "none"
    summary = "no attacker (the control trigger measures the backdoor base rate)"

    def __init__(self, *, control_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.control_trigger = control_trigger

    @classmethod
    def options(cls) -> dict[str, Any]:
        return {}

    def test_trigger(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.control_trigger
