"""Byzantine (untargeted) sanity-check attacks: crafted updates after training (docs/attacks.md §5).

Every attacker uploads w^t + Δ_mal. The update statistics μ, s are the coordinate-wise mean and
standard deviation of the benign updates of the round (``source="omniscient"``) or of the
attackers' own honest updates (``source="colluding"``). Knowledge is a class attribute that
bounds what the engine hands over; each class here declares the most its options may need and
the constructor lowers the instance's ``knowledge`` to what the chosen ``source`` needs, so a
colluding-configured attack never receives the benign uploads (``Attack.round_view`` and
``AttackPlan`` read the instance's level). The uploaded Fisher is the honest Fisher of the
uploaded model on the attacker's own training data (docs/attacks.md §5): the stages set
``fisher_at_upload`` and the engine's ``Server.end`` recomputes it after the stage, with the
client's own Fisher options and stream.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from fisherguard.attacks.base import Attack, AttackConfigError, RoundView
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.models import flatten
from fisherguard.seeding import derive_seed, numpy_stream, torch_stream

log = logging.getLogger("fisherguard")

SOURCES = ("colluding", "omniscient")
PERTURBATIONS = ("unit", "sign", "std")


def _well_formed(u: Upload, g: torch.Tensor) -> bool:
    w = u.weights
    return (isinstance(w, torch.Tensor) and w.shape == g.shape and w.is_floating_point()
            and bool(torch.isfinite(w).all()))


def updates(uploads: dict[int, Upload] | None, global_weights: torch.Tensor) -> torch.Tensor:
    """The well-formed updates Δ_k = w_k − w^t of some uploads, stacked (n, P), by client id."""
    rows = [u.weights - global_weights for k, u in sorted((uploads or {}).items())
            if _well_formed(u, global_weights)]
    if not rows:
        return global_weights.new_zeros((0, global_weights.numel()))
    return torch.stack(rows)


def mean_std(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise μ and s of (n, P) updates (s with Bessel's correction; 0 when n = 1)."""
    mu = deltas.mean(0)
    s = deltas.std(0, unbiased=True) if deltas.shape[0] > 1 else torch.zeros_like(mu)
    return mu, s


def _check_source(source: str, attack: str) -> None:
    if source not in SOURCES:
        raise AttackConfigError(f"{attack} source must be one of {', '.join(SOURCES)}, "
                                f"got {source!r}")


def _check_positive(value: float, option: str, attack: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise AttackConfigError(f"{attack} {option} must be a positive finite number, got {value!r}")


class _Crafted(Attack):
    """Shared part: collect the reference updates by ``source``, upload one crafted Δ to all."""

    kind = "byzantine"
    knowledge = "omniscient"  # the most ``source`` may ask for; the instance keeps what it uses
    fisher_at_upload = True
    source: str

    def _set_source(self, source: str) -> None:
        _check_source(source, self.name)
        self.source = source
        self.knowledge = source  # type: ignore[misc]  # the instance's level, read by the engine

    def reference(self, view: RoundView) -> torch.Tensor:
        """The updates μ and s are taken from: the benign ones or the attackers' own."""
        if self.source == "omniscient":
            return updates(view.benign, view.global_weights)
        if view.benign is not None:  # never expected: the engine hands them to omniscient stages only
            raise RuntimeError(f"{self.name}: a colluding stage was given the benign uploads")
        return updates(view.own, view.global_weights)

    def craft(self, deltas: torch.Tensor, view: RoundView) -> torch.Tensor | None:
        raise NotImplementedError

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        deltas = self.reference(view)
        if deltas.shape[0] == 0:
            log.warning("%s: no well-formed reference update in round %d; uploads unchanged",
                        self.name, view.round_idx + 1)
            return view.own
        delta = self.craft(deltas, view)
        if delta is None:
            return view.own
        for u in view.own.values():  # all colluders upload the same crafted vector
            u.weights = view.global_weights + delta
        return view.own


class SignFlip(_Crafted):
    """Sign flip, Δ_mal = −κ·Δ_own or −κ·μ (common baseline; docs/attacks.md §5)."""

    name = "sign-flip"
    paper = "common baseline (Blades, ByzFL, FLPoison)"
    summary = "byzantine: upload the negated (own or mean) update, scaled by kappa"

    def __init__(self, *, kappa: float = 1.0, source: str = "own") -> None:
        _check_positive(kappa, "kappa", self.name)
        if source not in ("own",) + SOURCES:
            raise AttackConfigError(f"sign-flip source must be one of own, {', '.join(SOURCES)}, "
                                    f"got {source!r}")
        self.kappa = float(kappa)
        self.source = source
        self.knowledge = "model" if source == "own" else source  # type: ignore[misc]

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        if self.source != "own":
            return super().after_training(view)
        g = view.global_weights
        for u in view.own.values():  # each attacker negates its own honest update
            if _well_formed(u, g):
                u.weights = g - self.kappa * (u.weights - g)
        return view.own

    def craft(self, deltas: torch.Tensor, view: RoundView) -> torch.Tensor:
        return -self.kappa * deltas.mean(0)


class GaussianNoise(_Crafted):
    """Gaussian noise, Δ_mal ~ N(0, σ²I) (common baseline; docs/attacks.md §5)."""

    name = "gaussian"
    paper = "common baseline (ByzFL, FLPoison)"
    summary = "byzantine: upload w^t plus Gaussian noise (sigma absolute or relative to ||mu||/sqrt(d))"
    knowledge = "colluding"

    def __init__(self, *, sigma: float = 1.0, scale: str = "absolute") -> None:
        _check_positive(sigma, "sigma", self.name)
        if scale not in ("absolute", "relative"):
            raise AttackConfigError(f"gaussian scale must be one of absolute, relative, got {scale!r}")
        self.sigma, self.scale = float(sigma), scale
        self.source = "colluding"
        # absolute noise needs nothing but w^t; relative noise reads the attackers' own mean update
        self.knowledge = "model" if scale == "absolute" else "colluding"  # type: ignore[misc]

    def std(self, view: RoundView) -> float:
        if self.scale == "absolute":
            return self.sigma
        own = updates(view.own, view.global_weights)
        if own.shape[0] == 0:
            return 0.0
        mu = own.mean(0)
        return self.sigma * float(mu.norm()) / math.sqrt(mu.numel())

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        g = view.global_weights
        sd = self.std(view)
        gen = torch_stream(self.ctx.seed, "gaussian", view.round_idx)
        noise = torch.randn(g.shape, generator=gen, dtype=g.dtype) * sd
        for u in view.own.values():  # one draw per round, shared by every attacker
            u.weights = g + noise
        return view.own


def alie_z_max(n: int, m: int) -> float:
    """ALIE's z_max: s₀ = ⌊n/2 + 1⌋ − m, z = Φ⁻¹((n − m − s₀)/(n − m)) (Baruch et al., 2019)."""
    if not 0 < m < n:
        raise AttackConfigError(f"alie z=auto needs 0 < attackers < clients, got m={m}, n={n}")
    s0 = math.floor(n / 2 + 1) - m
    q = (n - m - s0) / (n - m)
    if not 0.0 < q < 1.0:
        raise AttackConfigError(f"alie z=auto is undefined for n={n}, m={m} (quantile {q:.3f}); "
                                f"give z as a number")
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


class ALIE(_Crafted):
    """A little is enough, Δ_mal = μ + sign·z·s (Baruch et al., NeurIPS 2019; docs/attacks.md §5)."""

    name = "alie"
    paper = "Baruch, Baruch, Goldberg, NeurIPS 2019"
    summary = "byzantine: mean plus z standard deviations (z = z_max(n, m) by default)"

    def __init__(self, *, z: float | str = "auto", sign: int = 1,
                 source: str = "omniscient") -> None:
        if not (z == "auto" or (isinstance(z, (int, float)) and not isinstance(z, bool)
                                and math.isfinite(z))):
            raise AttackConfigError(f"alie z must be 'auto' or a finite number, got {z!r}")
        if sign not in (1, -1) or isinstance(sign, bool):
            raise AttackConfigError(f"alie sign must be 1 or -1, got {sign!r}")
        self.z, self.sign = z, sign
        self._set_source(source)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.z_used = (alie_z_max(ctx.num_clients, len(ctx.attackers)) if self.z == "auto"
                       else float(self.z))
        if self.z_used == 0.0:
            log.warning("alie: z = 0 for n=%d, m=%d: the attack uploads the mean update (a no-op)",
                        ctx.num_clients, len(ctx.attackers))

    def craft(self, deltas: torch.Tensor, view: RoundView) -> torch.Tensor:
        mu, s = mean_std(deltas)
        return mu + self.sign * self.z_used * s


class IPM(_Crafted):
    """Inner-product manipulation, Δ_mal = −ε·μ (Xie, Koyejo, Gupta, UAI 2019; docs/attacks.md §5)."""

    name = "ipm"
    paper = "Xie, Koyejo, Gupta, UAI 2019"
    summary = "byzantine: the mean update negated and scaled by epsilon"

    def __init__(self, *, epsilon: float = 0.1, source: str = "omniscient") -> None:
        _check_positive(epsilon, "epsilon", self.name)
        self.epsilon = float(epsilon)
        self._set_source(source)

    def craft(self, deltas: torch.Tensor, view: RoundView) -> torch.Tensor:
        return -self.epsilon * deltas.mean(0)


def perturbation(deltas: torch.Tensor, kind: str) -> torch.Tensor:
    """The direction p of Min-Max/Min-Sum: −μ/‖μ‖ (unit), −sign(μ) (sign) or −s (std)."""
    mu, s = mean_std(deltas)
    if kind == "unit":
        return -mu / mu.norm().clamp_min(1e-12)
    if kind == "sign":
        return -torch.sign(mu)
    return -s


def gamma_search(ok: Callable[[float], bool], start: float = 10.0, tol: float = 1e-5) -> float:
    """The largest γ found by the halving search of Shejwalkar & Houmansadr (0 if none passes).

    γ starts at ``start``; after each test the step halves, γ moves up on success and down on
    failure, until the last success and the current γ differ by at most ``tol``.
    """
    gamma, step, good = start, start, 0.0
    while abs(good - gamma) > tol:
        if ok(gamma):
            good = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return good


class _MinAttack(_Crafted):
    """Shared part of Min-Max and Min-Sum: Δ_mal = μ + γ·p with γ from the halving search."""

    paper = "Shejwalkar, Houmansadr, NDSS 2021"

    def __init__(self, *, perturbation: str = "unit", gamma_init: float = 10.0,
                 tolerance: float = 1e-5, source: str = "omniscient") -> None:
        if perturbation not in PERTURBATIONS:
            raise AttackConfigError(f"{self.name} perturbation must be one of "
                                    f"{', '.join(PERTURBATIONS)}, got {perturbation!r}")
        _check_positive(gamma_init, "gamma_init", self.name)
        _check_positive(tolerance, "tolerance", self.name)
        self.perturbation, self.gamma_init, self.tolerance = perturbation, float(gamma_init), \
            float(tolerance)
        self._set_source(source)

    @staticmethod
    def allowed(deltas: torch.Tensor) -> Callable[[torch.Tensor], bool]:
        raise NotImplementedError

    def craft(self, deltas: torch.Tensor, view: RoundView) -> torch.Tensor:
        d = deltas.double()
        mu = d.mean(0)
        p = perturbation(d, self.perturbation)
        fits = self.allowed(d)
        self.last_gamma = gamma_search(lambda g: fits(mu + g * p), self.gamma_init, self.tolerance)
        return (mu + self.last_gamma * p).to(deltas.dtype)


class MinMax(_MinAttack):
    """Min-Max, max_i ‖Δ_mal − Δ_i‖ ≤ max_ij ‖Δ_i − Δ_j‖ (Shejwalkar & Houmansadr, NDSS 2021; docs/attacks.md §5)."""

    name = "min-max"
    summary = "byzantine: mean plus the largest gamma*p no farther from any update than the updates' diameter"

    @staticmethod
    def allowed(deltas: torch.Tensor) -> Callable[[torch.Tensor], bool]:
        bound = float(torch.cdist(deltas, deltas).max())
        return lambda x: float((deltas - x).norm(dim=1).max()) <= bound


class MinSum(_MinAttack):
    """Min-Sum, Σ_i ‖Δ_mal − Δ_i‖² ≤ max_j Σ_i ‖Δ_j − Δ_i‖² (Shejwalkar & Houmansadr, NDSS 2021; docs/attacks.md §5)."""

    name = "min-sum"
    summary = "byzantine: mean plus the largest gamma*p whose summed squared distance stays within the updates'"

    @staticmethod
    def allowed(deltas: torch.Tensor) -> Callable[[torch.Tensor], bool]:
        bound = float((torch.cdist(deltas, deltas) ** 2).sum(1).max())
        return lambda x: float(((deltas - x) ** 2).sum()) <= bound


class LabelFlip(Attack):
    """Label flip, y → (y + 1) mod C or a uniform other class with probability p (MarsFL PairFlip/SymFlip; docs/attacks.md §5)."""

    name = "label-flip"
    paper = "MarsFL PairFlip / SymFlip"
    summary = "byzantine data stage: flip each attacker label with probability p (pair or symmetric)"
    kind = "byzantine"
    knowledge = "data-only"

    def __init__(self, *, mode: str = "pair", poison_prob: float = 0.5) -> None:
        if mode not in ("pair", "symmetric"):
            raise AttackConfigError(f"label-flip mode must be one of pair, symmetric, got {mode!r}")
        if not isinstance(poison_prob, (int, float)) or not 0.0 <= poison_prob <= 1.0:
            raise AttackConfigError(f"label-flip poison_prob must be in [0, 1], got {poison_prob!r}")
        self.mode, self.poison_prob = mode, float(poison_prob)

    def flip(self, labels: torch.Tensor, num_classes: int, seed: int, client_id: int) -> torch.Tensor:
        """The flipped labels of one attacker, from stream (``label-flip``, client id)."""
        rng = numpy_stream(seed, "label-flip", client_id)
        n = len(labels)
        hit = torch.from_numpy(rng.random(n) < self.poison_prob)
        if self.mode == "pair":
            new = (labels + 1) % num_classes
        else:  # a uniform class among the C − 1 others
            shift = torch.from_numpy(rng.integers(1, num_classes, size=n)).to(labels.dtype)
            new = (labels + shift) % num_classes
        return torch.where(hit, new, labels)

    def poison(self, client_id: int, data: ClientDataset, seed: int) -> ClientDataset:
        labels = self.flip(data.labels, self.ctx.num_classes, seed, client_id)
        return ClientDataset(labels=labels, pipeline=data.pipeline, images=data.images,
                             frozen=data.frozen, poisoned=data.poisoned, trigger=data.trigger)


class RandomModel(Attack):
    """Random model, upload a fresh random initialisation or move halfway to one (MarsFL RandomNoise/AddNoise; docs/attacks.md §5)."""

    name = "random-model"
    paper = "MarsFL RandomNoise / AddNoise"
    summary = "byzantine: upload a fresh seeded random initialisation (or the midpoint to one)"
    kind = "byzantine"
    knowledge = "model"
    fisher_at_upload = True

    def __init__(self, *, mode: str = "replace") -> None:
        if mode not in ("replace", "halfway"):
            raise AttackConfigError(f"random-model mode must be one of replace, halfway, got {mode!r}")
        self.mode = mode

    def random_weights(self, round_idx: int, client_id: int) -> torch.Tensor:
        """A default initialisation of the federation's model from stream (``random-model``, round, id)."""
        if self.ctx.model_factory is None:
            raise AttackConfigError("random-model needs the federation's model (ctx.model_factory)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "random-model", round_idx, client_id))
            return flatten(self.ctx.model_factory()).detach().clone()

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        g = view.global_weights
        for k, u in view.own.items():
            r = self.random_weights(view.round_idx, k).to(g.dtype)
            if self.mode == "replace" or not _well_formed(u, g):
                u.weights = r
            else:
                u.weights = u.weights + 0.5 * (r - u.weights)
        return view.own
