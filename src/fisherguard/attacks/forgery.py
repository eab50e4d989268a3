"""Upload forgeries against the Fisher statistics (docs/attacks.md §4): stages that rewrite the
Fisher vector or the sample count an attacker uploads, composable after any backdoor stage
(``badnets+f-spike``, ``badnets+pgd+neurotoxin+f-mimic``).

Each stage runs in ``after_training`` on the attackers' uploads. A Fisher the engine's
``RoundView.fisher`` computes is the client's own: same options, same stream, so an honest-looking
vector costs the attacker what it costs an honest client. When the defense reads no Fisher the
view has none and the Fisher forgeries leave the uploads unchanged (with a warning once).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fisherguard.attacks.base import Attack, AttackConfigError, RoundView
from fisherguard.attacks.pgd import CleanReference
from fisherguard.attacks.scaling import check_positive
from fisherguard.clients.training import Upload

log = logging.getLogger("fisherguard")
Tensor = torch.Tensor


def check_choice(attack: str, option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AttackConfigError(f"{attack} option {option} must be one of "
                                f"{', '.join(allowed)}, got {value!r}")


def well_formed(x: Any, like: Tensor) -> bool:
    """A finite float vector of the global model's length."""
    return (isinstance(x, Tensor) and x.shape == like.shape and x.is_floating_point()
            and bool(torch.isfinite(x).all()))


def minmax(f: Tensor) -> Tensor:
    """FDCR's importance I = (F − min F)/(max F − min F); zeros for a constant vector."""
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo) if bool(hi > lo) else torch.zeros_like(f)


class Forgery(Attack):
    """Shared part: the honest Fisher of an upload and a per-upload rewrite."""

    kind = "upload forgery"
    knowledge = "model"
    needs_view_fisher = False  # the forged vector needs Fisher values, not only shapes
    _warned = False

    def honest(self, view: RoundView, k: int, u: Upload) -> Tensor | None:
        """F(D_k; w_k) of the upload: the one it carries, else computed through the seam."""
        if well_formed(u.fisher, view.global_weights):
            return u.fisher
        if view.fisher is not None and well_formed(u.weights, view.global_weights):
            return view.fisher(k, u.weights, None)
        return None

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        if self.needs_view_fisher and view.fisher is None:
            if not self._warned:  # the defense reads no Fisher: nothing to forge
                log.warning("%s: the defense reads no Fisher; uploads unchanged", self.name)
                self._warned = True
            return view.own
        for k, u in sorted(view.own.items()):
            self.forge(view, k, u)
        return view.own

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        raise NotImplementedError


class FZero(Forgery):
    """F ≡ 0 (docs/attacks.md §4.1)."""

    name = "f-zero"
    paper = "fisherguard threat analysis (docs/attacks.md §4.1)"
    summary = "upload forgery: a zero Fisher vector"
    needs_view_fisher = True

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        u.fisher = torch.zeros_like(view.global_weights)


class FConst(Forgery):
    """F ≡ c, c = mean of the attacker's honest Fisher by default (docs/attacks.md §4.1)."""

    name = "f-const"
    paper = "fisherguard threat analysis (docs/attacks.md §4.1)"
    summary = "upload forgery: a constant Fisher vector (c = mean of the honest Fisher)"
    needs_view_fisher = True

    def __init__(self, *, c: float | str = "mean") -> None:
        if c != "mean":
            check_positive(self.name, "c", c)
        self.c = c

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        h = self.honest(view, k, u)
        c = float(h.mean()) if self.c == "mean" and h is not None else \
            1.0 if self.c == "mean" else float(self.c)
        u.fisher = torch.full_like(view.global_weights, c)


def spike_count(r: float | int, p: int) -> int:
    """r entries when r is an integer ≥ 1, else the fraction r of P (at least one)."""
    return int(r) if isinstance(r, int) else max(1, round(float(r) * p))


class FSpike(Forgery):
    """F = 0 except r entries = s at the coordinates of smallest |Δ_k| (docs/attacks.md §4.2)."""

    name = "f-spike"
    paper = "fisherguard threat analysis (docs/attacks.md §4.2)"
    summary = "upload forgery: a zero Fisher with r spikes of size s where |delta| is smallest"
    needs_view_fisher = True

    def __init__(self, *, r: float | int = 1, s: float = 1e6) -> None:
        ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
            isinstance(r, float) and 0 < r < 1)
        if not ok:
            raise AttackConfigError(f"{self.name} option r must be an integer >= 1 (entries) or a "
                                    f"fraction of P in (0, 1), got {r!r}")
        check_positive(self.name, "s", s)
        self.r, self.s = r, float(s)

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        g = view.global_weights
        if not well_formed(u.weights, g):
            return
        n = min(spike_count(self.r, g.numel()), g.numel())
        idx = torch.argsort((u.weights - g).abs(), stable=True)[:n]
        f = torch.zeros_like(g)
        f[idx] = self.s
        u.fisher = f


NONFINITE = ("nan", "inf", "negative", "missing", "shape")


class FNonfinite(Forgery):
    """NaN at r entries, +inf at one, the honest Fisher negated, none, or the wrong length
    (docs/attacks.md §4.3)."""

    name = "f-nonfinite"
    paper = "fisherguard threat analysis (docs/attacks.md §4.3)"
    summary = "upload forgery (DoS): nan | inf | negative | missing | shape Fisher"
    needs_view_fisher = True

    def __init__(self, *, mode: str = "nan", r: int = 1) -> None:
        check_choice(self.name, "mode", mode, NONFINITE)
        check_positive(self.name, "r", r, integer=True)
        self.mode, self.r = mode, r

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        if self.mode == "missing":
            u.fisher = None
            return
        h = self.honest(view, k, u)
        base = (h if h is not None else torch.ones_like(view.global_weights)).clone()
        if self.mode == "nan":
            base[:self.r] = float("nan")
        elif self.mode == "inf":
            base[0] = float("inf")
        elif self.mode == "negative":
            base = -base
        else:  # shape: one entry short
            base = base[:-1]
        u.fisher = base


COUNT_MODES = ("zero", "negative", "non_integer")


class CountForgery(Forgery):
    """n_k = 0 (or −n_k, or a non-integer n_k + 0.5) (docs/attacks.md §4.3)."""

    name = "count-forgery"
    paper = "fisherguard threat analysis (docs/attacks.md §4.3)"
    summary = "metadata forgery: report n_k = 0 (or negative, or not an integer)"

    def __init__(self, *, mode: str = "zero") -> None:
        check_choice(self.name, "mode", mode, COUNT_MODES)
        self.mode = mode

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        n = u.num_samples
        u.num_samples = 0 if self.mode == "zero" else -n if self.mode == "negative" else n + 0.5


class CountInflation(Forgery):
    """Report c·n_k samples (docs/attacks.md §4.9)."""

    name = "count-inflation"
    paper = "fisherguard threat analysis (docs/attacks.md §4.9)"
    summary = "metadata forgery: report factor times the true sample count"

    def __init__(self, *, factor: float = 10) -> None:
        check_positive(self.name, "factor", factor)
        self.factor = factor

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        u.num_samples = int(round(self.factor * int(u.num_samples)))


class FDRegSkip(Attack):
    """Train with λ = 0: the plan's ``follow_protocol`` is off (docs/attacks.md §4.10)."""

    name = "fdreg-skip"
    paper = "fisherguard threat analysis (docs/attacks.md §4.10)"
    summary = "protocol deviation: attackers drop the defense's client-side term (SDFC FDReg)"
    kind = "protocol deviation"
    knowledge = "data-only"
    breaks_protocol = True


def clean_reference_fisher(attack: Attack, ref: CleanReference, view: RoundView,
                           k: int) -> tuple[Tensor, Tensor]:
    """(w_ref, F_ref): a clean model trained from w^t on the attacker's clean samples with the
    benign optimiser, and its Fisher on those samples (docs/attacks.md §4.4 proxy)."""
    assert view.fisher is not None
    clean = attack.ctx.clean_data.get(k)
    if clean is None:
        raise AttackConfigError(f"{attack.name}: client {k} has no clean data")
    w_ref = view.global_weights + ref.update(attack.ctx, k, view.round_idx, view.global_weights)
    return w_ref, view.fisher(k, w_ref, clean)


def rescale_to(f: Tensor, like: Tensor) -> Tensor:
    """Affine map of f onto the min and max of ``like`` (benign magnitudes)."""
    lo, hi = f.min(), f.max()
    if not bool(hi > lo):
        return f
    return like.min() + (f - lo) * (like.max() - like.min()) / (hi - lo)


MIMIC_SOURCES = ("proxy", "omniscient")


class FMimic(Forgery):
    """A benign-looking Fisher: a clean reference model's (proxy) or the benign mean
    (omniscient) (docs/attacks.md §4.4)."""

    name = "f-mimic"
    paper = "fisherguard threat analysis (docs/attacks.md §4.4)"
    summary = "upload forgery: clean-reference (proxy) or mean benign (omniscient) Fisher"
    knowledge = "omniscient"  # the most ``source`` may ask for; the instance keeps what it uses
    needs_view_fisher = True

    def __init__(self, *, source: str = "proxy", rescale: bool = False) -> None:
        check_choice(self.name, "source", source, MIMIC_SOURCES)
        if not isinstance(rescale, bool):
            raise AttackConfigError(f"{self.name} option rescale must be true or false, "
                                    f"got {rescale!r}")
        self.source, self.rescale = source, rescale
        self.knowledge = "model" if source == "proxy" else "omniscient"  # type: ignore[misc]
        self.reference = CleanReference("f-mimic-reference")

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        g = view.global_weights
        if self.source == "omniscient":
            rows = [b.fisher for _, b in sorted((view.benign or {}).items())
                    if well_formed(b.fisher, g)]
            if not rows:
                return
            f = torch.stack(rows).mean(0)
        else:
            if view.benign is not None:  # the engine hands them to omniscient stages only
                raise RuntimeError(f"{self.name}: a proxy stage was given the benign uploads")
            f = clean_reference_fisher(self, self.reference, view, k)[1]
        if self.rescale:
            h = self.honest(view, k, u)
            if h is not None:
                f = rescale_to(f, h)
        u.fisher = f.clone()


MISMATCH = ("clean_subset", "stale_model", "mask_topq")


class FMismatch(Forgery):
    """A real Fisher computed elsewhere: on the clean samples, at w^t, or with the top-q moved
    coordinates zeroed (docs/attacks.md §4.6)."""

    name = "f-mismatch"
    paper = "fisherguard threat analysis (docs/attacks.md §4.6)"
    summary = "upload forgery: Fisher on clean samples | at w^t | masked on the top-q moved coords"
    needs_view_fisher = True

    def __init__(self, *, mode: str = "clean_subset", q: float = 0.05,
                 eps: float = 1e-12) -> None:
        check_choice(self.name, "mode", mode, MISMATCH)
        if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < 1):
            raise AttackConfigError(f"{self.name} option q must be a fraction in (0, 1), got {q!r}")
        check_positive(self.name, "eps", eps)
        self.mode, self.q, self.eps = mode, float(q), float(eps)

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        g = view.global_weights
        assert view.fisher is not None
        if not well_formed(u.weights, g):
            return
        if self.mode == "clean_subset":
            u.fisher = view.fisher(k, u.weights, self.ctx.clean_data[k])
        elif self.mode == "stale_model":
            u.fisher = view.fisher(k, g, None)
        else:
            h = self.honest(view, k, u)
            if h is None:
                return
            u.fisher = mask_topq(h, u.weights - g, self.q, self.eps)


def mask_topq(honest: Tensor, delta: Tensor, q: float, eps: float) -> Tensor:
    """F_honest ⊙ 1[|Δ_v| < Q_{1−q}(|Δ|)] + ε (docs/attacks.md §4.6)."""
    a = delta.abs().to(torch.float64)
    cut = torch.quantile(a, 1.0 - q) if a.numel() <= 16_000_000 else a.kthvalue(
        max(1, math.ceil((1.0 - q) * a.numel()))).values
    return honest * (a < cut).to(honest.dtype) + eps
