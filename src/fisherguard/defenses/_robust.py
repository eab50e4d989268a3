"""Helpers shared by the distance- and statistics-based baselines (docs/baselines.md §1–§3).

Everything here works in float64 on the *valid* rows of a round, ordered by client id, so that a
rule's result does not depend on the order in which clients were presented (docs/baselines.md §1,
"results must not depend on client order"; ties are broken by lowest client id).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from fisherguard.defenses.base import DefenseConfigError, check_choice, check_flag, check_range

Tensor = torch.Tensor

ON_VIOLATION = ("cap", "raise")


# ----------------------------------------------------------------------------------------------
# Order


def stable_order(scores: Tensor) -> list[int]:
    """Row indices sorted by score; equal scores keep row order, i.e. lowest client id first."""
    return sorted(range(int(scores.numel())), key=lambda i: (float(scores[i]), i))


# ----------------------------------------------------------------------------------------------
# Distances and Krum


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances (n, n) in float64, from explicit differences.

    The Gram-matrix shortcut ‖x‖²+‖y‖²−2x·y cancels catastrophically for close points (Flower's
    new API shows tiny negative values, docs/baselines.md §4); n is small, so the exact form is cheap.
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        diff = x[i + 1:] - x[i]
        row = (diff * diff).sum(1)
        d[i, i + 1:] = row
        d[i + 1:, i] = row
    return d


def krum_scores(dist: Tensor, f: int, neighbours: int | None = None) -> Tensor:
    """Krum score s_i = sum of the distances to the ``neighbours`` closest *other* points.

    Default neighbours = max(1, n − f − 2) (Blanchard et al. 2017, §4). The point itself is
    excluded by index, not by assuming it sorts first, so exact duplicates are handled correctly
    (Flower's ``argsort(row)[1:]`` can skip a duplicate instead, docs/baselines.md §4).
    """
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    m = max(1, n - f - 2) if neighbours is None else neighbours
    m = min(max(m, 1), n - 1)
    scores = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1:]])
        scores[i] = torch.sort(others).values[:m].sum()
    return scores


def krum_select(dist: Tensor, f: int, count: int, neighbours: int | None = None
                ) -> tuple[list[int], Tensor]:
    """The ``count`` rows with the lowest Krum scores (ties: lowest client id) and all scores."""
    scores = krum_scores(dist, f, neighbours)
    return stable_order(scores)[:count], scores


# ----------------------------------------------------------------------------------------------
# Coordinate-wise statistics


def coordinate_median(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate median (mean of the two middle values for even n) and per-row share.

    The share (n, P) is 1 for the middle row (odd n) or 1/2 for each of the two middle rows
    (even n); a stable sort attributes tied values to the lowest client id.
    """
    n = x.shape[0]
    vals, idx = torch.sort(x, dim=0, stable=True)
    share = torch.zeros_like(x)
    if n % 2 == 1:
        med = vals[n // 2]
        share.scatter_(0, idx[n // 2:n // 2 + 1], 1.0)
    else:
        # (a + b) / 2, the same operation order as numpy.median, so results agree bit-for-bit.
        med = (vals[n // 2 - 1] + vals[n // 2]) / 2
        share.scatter_(0, idx[n // 2 - 1:n // 2 + 1], 0.5)
    return med, share


def trimmed_mean(x: Tensor, cut: int) -> tuple[Tensor, Tensor]:
    """Drop the ``cut`` smallest and largest values per coordinate, average the rest.

    Returns the mean and a 0/1 mask (n, P) of the values that were kept.
    """
    n = x.shape[0]
    if cut < 0 or 2 * cut >= n:
        raise ValueError(f"cannot trim {cut} per tail from {n} values")
    vals, idx = torch.sort(x, dim=0, stable=True)
    keep = torch.zeros_like(x)
    keep.scatter_(0, idx[cut:n - cut], 1.0)
    return vals[cut:n - cut].mean(0), keep


def closest_to_centre_mean(x: Tensor, centre: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Per coordinate, the mean of the ``keep`` values closest to ``centre`` (Bulyan's step 2).

    Ties in distance go to the lower row (client id) via a stable sort. Returns the mean and a
    0/1 mask (n, P) of the values used.
    """
    n = x.shape[0]
    keep = min(max(keep, 1), n)
    order = torch.sort((x - centre).abs(), dim=0, stable=True).indices[:keep]
    # Averaging offsets from the centre (as MarsFL does) returns identical inputs exactly.
    offsets = torch.gather(x, 0, order) - centre
    used = torch.zeros_like(x)
    used.scatter_(0, order, 1.0)
    return centre + offsets.mean(0), used


def share_to_weights(share: Tensor) -> Tensor:
    """Per-row effective weight of a coordinate-wise rule: its mean share over coordinates.

    ``share`` (n, P) holds the weight each row's value has in each output coordinate (the
    columns sum to 1), so the result sums to 1 and is 0 exactly for a row that contributed to
    no coordinate.
    """
    if share.shape[1] == 0:
        return torch.full((share.shape[0],), 1.0 / max(share.shape[0], 1), dtype=torch.float64)
    return share.to(torch.float64).mean(1)


# ----------------------------------------------------------------------------------------------
# Options shared by several defenses


def check_finite(name: str, value: Any) -> None:
    """Raise DefenseConfigError when a number already range-checked is infinite."""
    if value is not None and not math.isfinite(value):
        raise DefenseConfigError(f"{name} must be a finite number, got {value!r}")


check_bool = check_flag


def check_seed(value: Any) -> None:
    check_range("seed", value, low=0, integer=True)


def make_generator(seed: int, consumer: str, streams: str = "named") -> torch.Generator:
    """The generator of one consumer's stream (docs/protocol.md §7.5; ``seeding.DEFENSE_STREAMS``)."""
    from fisherguard.seeding import STREAMS, defense_generator

    check_choice("streams", streams, STREAMS)
    return defense_generator(int(seed), consumer, streams)


class AssumedAttackers:
    """The assumed attacker count f of docs/baselines.md §1.

    ``f`` set explicitly wins and must satisfy the rule's precondition for the round's K (a
    configuration error otherwise); when it is None the engine's ``assumed_attackers``
    (⌊Υ·K⌋) is used and a violation is handled by ``on_violation``: ``cap`` uses the largest
    legal f and reports ``assumption_violated``, ``raise`` refuses the run.
    """

    def _init_attackers(self, f: int | None, assumed_attackers: int, on_violation: str) -> None:
        check_range("f", f, low=0, integer=True, allow_none=True)
        check_range("assumed_attackers", assumed_attackers, low=0, integer=True)
        check_choice("on_violation", on_violation, ON_VIOLATION)
        self.f = None if f is None else int(f)
        self.assumed_attackers = int(assumed_attackers)
        self.on_violation = on_violation

    def _f_limit(self, k: int) -> tuple[int, str] | None:
        """(largest legal f, precondition text) for K clients; None when f is not used."""
        raise NotImplementedError

    def check_clients(self, num_clients: int) -> None:
        """Fail before training when the options cannot work with this many clients.

        The same check runs in every ``combine``; calling it at configuration time turns a
        K-dependent mistake (an explicit f that is too large) into an error before round 0.
        """
        limit = self._f_limit(num_clients)
        if limit is not None:
            self._resolve_f(num_clients, *limit)

    def _resolve_f(self, k: int, max_legal: int, precondition: str) -> tuple[int, bool]:
        """(f to use, assumption_violated) for a round of ``k`` clients."""
        max_legal = max(0, max_legal)
        if self.f is not None:
            if self.f > max_legal:
                raise DefenseConfigError(
                    f"f={self.f} violates {type(self).__name__}'s precondition {precondition} for "
                    f"K={k} clients; the largest legal f is {max_legal}")
            return self.f, False
        f = self.assumed_attackers
        if f <= max_legal:
            return f, False
        if self.on_violation == "raise":
            raise DefenseConfigError(
                f"the assumed attacker count f={f} (from the attacker fraction) violates "
                f"{type(self).__name__}'s precondition {precondition} for K={k} clients and "
                f"on_violation='raise'; the largest legal f is {max_legal}")
        return max_legal, True


class ServerMomentum:
    """MarsFL's heavy-ball server step (docs/baselines.md §2, C1), with C2 fixed.

    MarsFL steps v ← 0.9·v − η·G on the robust pseudo-gradient G = (w − w_agg)/η, so
    −η·G = agg(Δ) and the server copy moves by v. Initialising that copy from the true global
    model (C2 fix) makes it equal to w^t every round, so w^{t+1} = w^t + v.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.velocity: Tensor | None = None

    def step(self, agg_delta: Tensor) -> Tensor:
        v = agg_delta.to(torch.float64)
        if self.velocity is not None and self.velocity.shape == v.shape:
            v = self.momentum * self.velocity + v
        self.velocity = v.clone()
        return v

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": None if self.velocity is None else self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("velocity")
        self.velocity = None if v is None else torch.as_tensor(v, dtype=torch.float64).clone()


def marsfl_corrupted_count(k: int) -> int:
    """MarsFL's "corrupted count" f − k with f = ⌊K/2⌋, k = K − f − 1: 1 for even K, 0 for odd
    (docs/baselines.md §2, C3)."""
    f = k // 2
    return f - (k - f - 1)


def load_keys(state: dict[str, Any], allowed: Sequence[str], owner: str) -> None:
    """Reject a state dict with keys this defense does not know (a resume from another rule)."""
    unknown = sorted(set(state) - set(allowed))
    if unknown:
        raise ValueError(f"{owner} state has unknown keys {unknown}; expected {sorted(allowed)}")



class CodeMomentumState:
    """state_dict/load_state_dict for rules whose `code` preset keeps MarsFL's server momentum."""

    preset: str
    _momentum: ServerMomentum

    def state_dict(self) -> dict[str, Any]:
        return self._momentum.state_dict() if self.preset == "code" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keys(state, ["velocity"] if self.preset == "code" else [], type(self).__name__)
        if state:
            self._momentum.load_state_dict(state)
