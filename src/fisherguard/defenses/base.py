"""The defense interface: one pure verb ``aggregate(RoundInput) -> Aggregate`` over plain tensors.

A defense never sees a model class, a data loader, the engine or attacker identities. The
in-process simulator and the Flower adapter call the same classes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import torch

from fisherguard.clients.regulariser import Regulariser  # noqa: F401 - re-exported for ClientPlan
from fisherguard.fisher import ESTIMATORS, LABEL_SOURCES

Tensor = torch.Tensor

# Reasons a client can be flagged (weight exactly 0). Upload-validity reasons come first.
UPLOAD_REASONS = ("missing", "bad_shape", "non_finite", "negative", "constant", "no_samples")

# Reasons that are failures, not detections (docs/protocol.md §7.6): the client did not answer
# (``missing``) or its upload was not valid input (the rest of UPLOAD_REASONS; ``non_finite``
# also where a defense finds that the uploaded model breaks its own computation). They stay out
# of TPR/FPR and are counted apart. Every other reason (``clustered_out``, ``spiky``, ``echo``,
# ``trimmed``, ``zero_weight``, ...) is a defense's judgement: a detection.
FAILURE_REASONS = frozenset(UPLOAD_REASONS)

# Claimed sample counts above COUNT_CAP × the round's lower median are clipped to it
# (docs/algorithms.md §8.3). Honest Dirichlet partitions stay below it: see bound_counts.
COUNT_CAP = 5.0

# ``preset``: the published algorithm (``paper``) or what the authors' released code does.
PRESETS = ("paper", "code")

# The diagnostics key under which a scoring or weighting defense reports its per-client
# suspicion: a list of K floats in RoundInput order, higher = more suspicious, None for a client
# it did not score (an invalid upload, or one refused by a check before scoring). Each class
# says what the number is in ``Defense.suspicion_score`` (None: the rule has no per-client
# score). Only ``metrics`` compares it with the attacker set (per-round ROC AUC and AP).
SUSPICION = "suspicion"


class DefenseConfigError(ValueError):
    """A hyperparameter is out of its allowed range; the message names it and the range."""


class ServerData(Protocol):
    """What a defense may ask of the server's clean validation set U, as callables on flat weights.

    The engine implements it (``fisherguard.engine.server_data``); a defense never sees the
    model class or the images.
    """

    size: int

    def fisher(self, weights: Tensor) -> Tensor:
        """Diagonal Fisher (P,) of the model with these flat weights on U (docs/algorithms.md §2)."""

    def subset(self, size: int) -> ServerData:
        """``size`` samples of U drawn for this round (U itself when ``size`` ≥ |U|): the same
        samples for every model evaluated on it."""

    def train(self, weights: Tensor, epochs: int) -> Tensor:
        """Flat weights after ``epochs`` of the clients' SGD on U, starting from ``weights``."""

    def loss_and_entropy(self, weights: Tensor) -> tuple[float, float]:
        """Mean cross-entropy and mean predictive entropy of the model on U (eval mode)."""


@dataclass
class ClientPlan:
    """What a defense asks one client to do differently in its next local training."""

    regulariser: Regulariser | None = None
    # A client that keeps its own model across rounds (RSA) starts from these weights, not w^t.
    start_weights: Tensor | None = None


@dataclass
class PlanInput:
    """What a defense with a client-side part sees before a round's local training starts.

    Planning has two phases: ``Defense.plan_fisher_requests`` names the client Fishers the plan
    needs; the engine fetches them (one client round trip) and ``Defense.plan_clients`` reads them
    from ``client_fishers``.
    """

    round_idx: int
    global_weights: Tensor
    client_ids: list[int]
    server_data: ServerData | None = None
    # phase 2: F(D_k; w) computed by client k on its own data at the weights phase 1 asked for;
    # None where the client could not answer (lost node, malformed reply)
    client_fishers: dict[int, Tensor | None] = field(default_factory=dict)


@dataclass
class RoundInput:
    """One round's uploads, as the server receives them."""

    global_weights: Tensor  # (P,)
    updates: Tensor  # (K, P), w_k - w^t
    num_samples: Tensor  # (K,), client-reported n_k
    client_ids: list[int]
    lr: float = 0.01
    round_idx: int = 0
    fisher: Tensor | None = None  # (K, P) or None; a row of NaN marks a missing Fisher
    server_data: ServerData | None = None
    num_rounds: int | None = None  # total rounds T, when known (CRFL's last round adds no noise)
    # Reasons found while assembling the matrices (a client sent the wrong shape or nothing).
    pre_reasons: list[str | None] | None = None
    # Bound on claimed counts, as a multiple of the valid clients' lower median (None = trust
    # every claim); applied by ``Defense.aggregate`` through ``bound_counts``.
    count_cap: float | None = COUNT_CAP

    @classmethod
    def from_uploads(cls, global_weights: Tensor, updates: Sequence[Any],
                     num_samples: Sequence[Any], client_ids: Sequence[int],
                     fisher: Sequence[Any] | None = None, **kw: Any) -> "RoundInput":
        """Stack per-client vectors of unknown shape; a malformed row becomes NaN with a reason."""
        p = int(global_weights.numel())
        k = len(client_ids)
        pre: list[str | None] = [None] * k

        def stack(rows: Sequence[Any], missing_reason: str) -> Tensor:
            out = torch.full((k, p), float("nan"), dtype=global_weights.dtype)
            for i in range(k):
                row = rows[i] if i < len(rows) else None
                if row is None:
                    pre[i] = pre[i] or missing_reason
                    continue
                try:
                    t = torch.as_tensor(row) if not isinstance(row, torch.Tensor) else row
                except (TypeError, ValueError, RuntimeError, OverflowError):
                    pre[i] = pre[i] or "bad_shape"
                    continue
                if not t.is_floating_point() or t.numel() != p or t.dim() != 1:
                    pre[i] = pre[i] or "bad_shape"
                    continue
                out[i] = t.to(out.dtype)
            return out

        upd = stack(updates, "bad_shape")
        # a client whose own training diverged uploads non-finite weights and no Fisher: it
        # replied, so its reason is non_finite, not missing
        for i in torch.nonzero(~torch.isfinite(upd).all(dim=1)).flatten().tolist():
            pre[i] = pre[i] or "non_finite"
        fis = stack(fisher, "missing") if fisher is not None else None
        counts = torch.tensor([float(n) if _positive_integer(n) else 0.0 for n in num_samples]
                              + [0.0] * (k - len(num_samples)), dtype=torch.float64)
        return cls(global_weights=global_weights, updates=upd, num_samples=counts,
                   client_ids=list(client_ids), fisher=fis, pre_reasons=pre, **kw)

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def num_params(self) -> int:
        return int(self.global_weights.numel())


@dataclass
class Aggregate:
    """A defense's answer for one round."""

    new_weights: Tensor  # (P,) global weights for the next round
    client_weights: Tensor  # (K,) float64, non-negative; 0 = removed or rejected
    flagged: Tensor  # (K,) bool
    reasons: list[str | None]  # per client: None or a reason such as "non_finite", "clustered_out"
    diagnostics: dict[str, Any] = field(default_factory=dict)  # per-client lists and round scalars
    # The model to evaluate this round when it differs from new_weights (CRFL evaluates pre-noise).
    eval_weights: Tensor | None = None
    status: str = "ok"


@dataclass
class Combined:
    """What a defense's ``combine`` step decided; ``Defense.aggregate`` turns it into the Aggregate.

    ``client_weights`` (K,) are in RoundInput order, 0 for a client the rule removed. A client
    that ends at weight 0 without a reason of its own gets ``zero_reason`` (``finish``).
    """

    client_weights: Tensor
    new_weights: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    zero_reason: str = "zero_weight"
    status: str = "ok"
    eval_weights: Tensor | None = None

    @classmethod
    def unchanged(cls, ri: RoundInput, status: str, **kw: Any) -> "Combined":
        """Every client at weight 0 and w^t kept: the rule refuses the whole round."""
        return cls(torch.zeros(ri.num_clients, dtype=torch.float64), ri.global_weights.clone(),
                   status=status, **kw)


class MissingServerDataError(ValueError, RuntimeError):
    """A defense that reads the server's clean data got a RoundInput without it.

    Both a ValueError and a RuntimeError: the copies this replaced raised one or the other.
    """


class Defense:
    """Base class: subclasses set the class attributes and implement ``combine``.

    ``aggregate`` is the one round every defense shares (a template method, not overridden):

    1. ``check_ready`` (hook; raises when the defense cannot aggregate at all);
    2. ``validate_uploads`` with the Fisher rows when ``needs_fisher``, then ``bound_counts``
       (every rule below sees the clipped counts);
    3. the valid rows in client-id order (``valid_rows``);
    4. ``reject`` (hook, default ``reject_all``) when no upload is valid;
    5. one clear ``MissingServerDataError`` when ``requires_server_data()`` (hook, default
       ``needs_server_data``) and ``RoundInput.server_data`` is None;
    6. ``combine`` (the rule itself) returns a ``Combined``;
    7. ``finish`` builds the Aggregate (``flagged`` = weight 0, every flag explained).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_fisher: ClassVar[bool] = False
    needs_server_data: ClassVar[bool] = False
    # FLTrust and Sageflow: under `code` their server data is MarsFL's 5 000 MNIST training images
    # whatever the task (docs/baselines.md C5; config ``server.root_set``)
    reads_root_set: ClassVar[bool] = False
    client_regulariser: ClassVar[str | None] = None
    # Only the labelled FDCR oracle ablation sets this; the engine then hands it the attacker ids.
    needs_attacker_ids: ClassVar[bool] = False
    # What diagnostics[SUSPICION] holds (one line, with its sign), or None: no per-client score.
    suspicion_score: ClassVar[str | None] = None

    def aggregate(self, round_input: RoundInput) -> Aggregate:
        """One round: validation, the rule's ``combine`` step, the Aggregate (see the class)."""
        ri = round_input
        self.check_ready(ri)
        reasons = validate_uploads(ri, require_fisher=self.needs_fisher)
        ri = counts_per_client(ri)
        ri, clipped = bound_counts(ri, reasons)
        rows = valid_rows(ri, reasons)
        if rows.n == 0:
            return self.reject(ri, reasons)
        if ri.server_data is None and self.requires_server_data():
            raise MissingServerDataError(f"defense {self.name!r} needs the server's clean data "
                                         "(RoundInput.server_data), got None")
        out = self.combine(ri, rows, reasons)
        diagnostics = out.diagnostics
        if clipped:
            diagnostics = {**diagnostics, **clipped}
        return finish(ri, out.client_weights, out.new_weights, reasons,
                      diagnostics=diagnostics, zero_reason=out.zero_reason,
                      status=out.status, eval_weights=out.eval_weights)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        """The rule: client weights and w^{t+1} from the valid uploads (at least one).

        ``rows`` holds the valid uploads in client-id order (float64); ``reasons`` is the
        per-client list in RoundInput order (None = valid). A rule that refuses a valid client
        writes its reason there (in place); ``aggregate`` passes the same list to ``finish``.
        """
        raise NotImplementedError

    def check_ready(self, ri: RoundInput) -> None:
        """Hook: raise when this defense cannot aggregate at all (before validation)."""

    def reject(self, ri: RoundInput, reasons: list[str | None]) -> Aggregate:
        """Hook: the answer when no upload passed validation (w^t kept, everyone flagged).

        Override to attach a full diagnostics record or to drop per-client state (FDCR, SDFC).
        """
        return reject_all(ri, reasons)

    def requires_server_data(self) -> bool:
        """Hook: whether this configuration reads ``RoundInput.server_data`` in ``combine``.

        Defaults to the class's ``needs_server_data`` (which tells the engine to provide it);
        a configuration that never touches U (e.g. Finetuning with 0 epochs) says False.
        """
        return self.needs_server_data

    def check_clients(self, num_clients: int) -> None:
        """Raise DefenseConfigError when the options cannot work with this many clients."""

    def plan_fisher_requests(self, plan_input: PlanInput) -> dict[int, Tensor]:
        """Phase 1 of planning: client id → the weights at which its Fisher F(D_k; w) is needed."""
        return {}

    def plan_clients(self, plan_input: PlanInput) -> dict[int, ClientPlan]:
        """Phase 2: client-side instructions for the coming round (none by default)."""
        return {}

    def fisher_options(self) -> dict[str, Any]:
        """Keyword options for the clients' Fisher computation (``fisherguard.fisher``)."""
        return {}

    def draws_randomness(self) -> bool:
        """Whether the defense, as configured, draws random numbers of its own (then the run's
        ``experiment.streams`` changes its results; docs/protocol.md §7.5)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Cross-round state, ``torch.save``-able; its tensors may be views of the live state
        (no copy at K = 1000), valid until the next round."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def get_params(self) -> dict[str, Any]:
        """Each constructor parameter with its current value, read from the attribute of the
        same name (every defense stores its arguments so).

        A value the constructor resolves (``None`` → the preset's choice) comes back resolved,
        so ``type(d)(**d.get_params())`` rebuilds an equal defense.
        """
        names = constructor_params(type(self))
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise AttributeError(f"{type(self).__name__} keeps no attribute for its constructor "
                                 f"parameter(s) {', '.join(missing)}")
        return {n: getattr(self, n) for n in names}


def constructor_params(cls: type) -> list[str]:
    """The names a defense's constructor accepts (its hyperparameters), in signature order."""
    params = inspect.signature(cls.__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in list(params.items())[1:] if p.kind in kinds]  # [0] is self


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    """Raise DefenseConfigError naming ``name`` and its allowed range when ``value`` is outside it."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise DefenseConfigError(f"{name} must be {kind}{' ' + rng if rng else ''}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise DefenseConfigError naming ``name`` when ``value`` is not one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise DefenseConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """Raise DefenseConfigError naming ``name`` when ``value`` is not a boolean."""
    if not isinstance(value, bool):
        raise DefenseConfigError(f"{name} must be true or false, got {value!r}")


def fisher_estimator_option(fisher_estimator: str | None, label_source: str, *, code: bool) -> str:
    """The Fisher estimator a Fisher-based defense uses: the preset's default unless given (docs/algorithms.md §2.4)."""
    estimator = fisher_estimator if fisher_estimator is not None else (
        "official_label_mixed" if code else "per_sample")
    check_choice("fisher_estimator", estimator, ESTIMATORS)
    check_choice("label_source", label_source, LABEL_SOURCES)
    if estimator == "official_label_mixed" and label_source != "dataset":
        raise DefenseConfigError("label_source must be 'dataset' with fisher_estimator "
                                 f"'official_label_mixed', got {label_source!r}")
    return estimator


def validate_uploads(ri: RoundInput, *, require_fisher: bool = False) -> list[str | None]:
    """Per-client rejection reason or None (docs/algorithms.md §8.1), checked in that section's order.

    Updates and Fisher rows are treated as hostile input: any shape, dtype or value is possible.
    """
    k_clients, p = ri.num_clients, ri.num_params
    reasons: list[str | None] = list(ri.pre_reasons) if ri.pre_reasons else [None] * k_clients
    if len(reasons) != k_clients:
        raise ValueError(f"pre_reasons has {len(reasons)} entries for {k_clients} clients")

    def well_formed(x: Any) -> bool:
        return (isinstance(x, torch.Tensor) and x.is_floating_point()
                and tuple(x.shape) == (k_clients, p))

    upd_ok, fis_ok = well_formed(ri.updates), well_formed(ri.fisher)
    for k in range(k_clients):
        if reasons[k] is not None:
            continue
        if require_fisher and (ri.fisher is None or (fis_ok and bool(torch.isnan(ri.fisher[k]).all()))):
            reasons[k] = "missing"
        elif not upd_ok or (require_fisher and not fis_ok):
            reasons[k] = "bad_shape"
        elif not _finite_model(ri.global_weights, ri.updates[k]):
            reasons[k] = "non_finite"
        elif require_fisher:
            reasons[k] = _fisher_reason(ri.fisher[k])
        if reasons[k] is None and not _positive_integer(
                ri.num_samples[k] if k < len(ri.num_samples) else None):
            reasons[k] = "no_samples"
    return reasons


def _finite_model(global_weights: Tensor, update: Tensor) -> bool:
    """w_k = w^t + Δ_k is finite in the model's own dtype (a float64 Δ can overflow float32 weights)."""
    if not bool(torch.isfinite(update).all()):
        return False
    wk = (global_weights.to(torch.float64) + update.to(torch.float64)).to(global_weights.dtype)
    return bool(torch.isfinite(wk).all())


def _fisher_reason(f: Tensor) -> str | None:
    if not bool(torch.isfinite(f).all()):
        return "non_finite"
    if bool((f < 0).any()):
        return "negative"
    fmax = float(f.max())
    if fmax == 0.0 or fmax - float(f.min()) <= 1e-6 * float(f.abs().max()):
        return "constant"
    return None


MAX_SAMPLES = 2 ** 53  # the largest count float64 holds exactly; larger claims cannot be checked


def _positive_integer(n: Any) -> bool:
    """A sample count must be a positive integer that float64 holds exactly (so Σn stays finite)."""
    try:
        v = float(n)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(v) and 0 < v <= MAX_SAMPLES and v.is_integer()


def counts_per_client(ri: RoundInput) -> RoundInput:
    """The RoundInput with exactly one float64 count per client (the same object when it has).

    ``validate_uploads`` already gives a client without a count ``no_samples``; padding the
    vector with 0 (and dropping counts past K) lets every rule index it by client.
    """
    n = ri.num_samples
    k = ri.num_clients
    if isinstance(n, torch.Tensor) and tuple(n.shape) == (k,):
        return ri
    flat = torch.as_tensor(n, dtype=torch.float64).reshape(-1)[:k]
    full = torch.zeros(k, dtype=torch.float64)
    full[:flat.numel()] = flat
    return dataclasses.replace(ri, num_samples=full)


def bound_counts(ri: RoundInput, reasons: list[str | None]
                 ) -> tuple[RoundInput, dict[str, Any]]:
    """Clip claimed counts above ``count_cap`` × the valid lower median (docs/algorithms.md §8.3).

    The one place every count-weighted rule gets its n_k from: the bound is set relative to
    what the round's own clients claim, so a liar needs more than half of the valid clients to
    move it. Honest Dirichlet(β) partitions (``partition.dirichlet``, 300 seeds each) reached
    max/lower-median 2.15 at K = 10, β = 0.5 and 3.28 at K = 50, β = 0.5 (6.24 at K = 50,
    β = 0.1; 11.1 at K = 100, β = 0.1: set a larger cap or None for such skews). Returns the
    RoundInput to aggregate (the same object when nothing is clipped) and, when a count was
    clipped, the diagnostics ``count_clipped`` (client ids) and ``count_bound``.
    """
    cap = ri.count_cap
    if cap is None:
        return ri, {}
    if not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap >= 1):
        raise DefenseConfigError(f"count_cap must be a number >= 1 or None, got {cap!r}")
    pos = [k for k in range(ri.num_clients) if reasons[k] is None]
    if len(pos) < 2:
        return ri, {}
    counts = ri.num_samples.to(torch.float64)
    valid = sorted(float(counts[k]) for k in pos)
    bound = math.floor(cap * valid[(len(valid) - 1) // 2])
    over = [k for k in pos if float(counts[k]) > bound]
    if not over:
        return ri, {}
    clipped = counts.clone()
    clipped[over] = float(bound)
    out = dataclasses.replace(ri, num_samples=clipped)
    return out, {"count_clipped": [int(ri.client_ids[k]) for k in over],
                 "count_bound": float(bound)}


def reject_all(ri: RoundInput, reasons: list[str | None], status: str = "no_valid_clients", *,
               diagnostics: dict[str, Any] | None = None) -> Aggregate:
    """The answer when no client passed validation: the global model is returned unchanged."""
    k = ri.num_clients
    return Aggregate(
        new_weights=ri.global_weights.clone(),
        client_weights=torch.zeros(k, dtype=torch.float64),
        flagged=torch.ones(k, dtype=torch.bool),
        reasons=list(reasons),
        diagnostics={} if diagnostics is None else diagnostics,
        status=status,
    )


def finish(ri: RoundInput, weights: Tensor, new_weights: Tensor, reasons: list[str | None], *,
           diagnostics: dict[str, Any] | None = None, zero_reason: str = "zero_weight",
           status: str = "ok", eval_weights: Tensor | None = None) -> Aggregate:
    """Build an Aggregate whose ``flagged`` is exactly "weight 0" (docs/protocol.md §7.6).

    A client with weight 0 and no reason yet gets ``zero_reason`` so every flag is explained.
    """
    weights = weights.to(torch.float64)
    # checked in the model's dtype: a float64 result above float32's range (FDCR's importance
    # weighting of a 3e38 update, found by fuzzing) is inf once cast
    new_weights = new_weights.to(ri.global_weights.dtype)
    if not bool(torch.isfinite(new_weights).all()):
        # a safety net behind validation: keep w^t rather than spread NaN/inf to every client
        new_weights, status = ri.global_weights.clone(), "non_finite_result"
    flagged = weights == 0
    reasons = list(reasons)
    for k in range(ri.num_clients):
        if bool(flagged[k]) and reasons[k] is None:
            reasons[k] = zero_reason
    return Aggregate(new_weights=new_weights, client_weights=weights,
                     flagged=flagged, reasons=reasons,
                     diagnostics={} if diagnostics is None else diagnostics,
                     eval_weights=eval_weights, status=status)


def weighted_sum(alpha: Tensor, rows: Tensor, block: int = 8192) -> Tensor:
    """Σ_k α_k · rows_k in float64, one block of columns at a time: the same per-column products
    and sums as ``(α[:, None] * rows.double()).sum(0)`` without its two (n, P) float64 blocks
    (150 MB at n = 100 clients of SimpleCNN's P)."""
    a = alpha.to(torch.float64).unsqueeze(1)
    return torch.cat([(a * rows[:, s:s + block].to(torch.float64)).sum(0)
                      for s in range(0, rows.shape[1], block)])


def valid_mask(reasons: list[str | None]) -> Tensor:
    return torch.tensor([r is None for r in reasons], dtype=torch.bool)


class Rows:
    """The valid clients of a round in client-id order; their float64 updates on first use.

    ``deltas`` (n, P) and ``counts`` (n,) are built lazily, so a rule that works on the
    RoundInput directly (FedAvg, FDCR, SDFC) never pays for the float64 copy.
    """

    def __init__(self, ri: RoundInput, positions: Sequence[int]) -> None:
        self._ri = ri
        self.index = torch.tensor(list(positions), dtype=torch.long)  # positions in RoundInput
        self.ids: list[int] = [ri.client_ids[i] for i in positions]
        self._deltas: Tensor | None = None
        self._counts: Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.index.numel())

    @property
    def deltas(self) -> Tensor:
        """(n, P) float64 updates of the rows."""
        if self._deltas is None:
            self._deltas = (self._ri.updates[self.index].to(torch.float64) if self.n else
                            torch.zeros(0, self._ri.num_params, dtype=torch.float64))
        return self._deltas

    @property
    def counts(self) -> Tensor:
        """(n,) float64 sample counts of the rows."""
        if self._counts is None:
            self._counts = (self._ri.num_samples.to(torch.float64)[self.index] if self.n else
                            torch.zeros(0, dtype=torch.float64))
        return self._counts

    def scatter(self, values: Tensor, k: int, fill: float = 0.0) -> Tensor:
        """Place per-row values back at their RoundInput positions (length K, float64)."""
        out = torch.full((k,), fill, dtype=torch.float64)
        out[self.index] = values.to(torch.float64)
        return out

    def per_client(self, values: Tensor | Sequence[float], k: int) -> list[float | None]:
        """A JSON-friendly per-client list (None for rejected clients) in RoundInput order."""
        out: list[float | None] = [None] * k
        vals = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        for pos, v in zip(self.index.tolist(), vals):
            out[pos] = float(v)
        return out


def valid_rows(ri: RoundInput, reasons: list[str | None]) -> Rows:
    """The rows that passed ``validate_uploads``, sorted by client id.

    Results then do not depend on the order clients were presented in (docs/baselines.md §1; ties
    go to the lowest client id).
    """
    ok = valid_mask(reasons)
    pos = [i for i in range(ri.num_clients) if bool(ok[i])]
    pos.sort(key=lambda i: ri.client_ids[i])
    return Rows(ri, pos)
