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

from fisherguard.attacks.base import Attack, AttackConfigError, RoundView, check_state_keys, \
    state_tensor
from fisherguard.attacks.pgd import CleanReference
from fisherguard.attacks.scaling import check_positive
from fisherguard.clients.fdreg import FDReg
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.seeding import torch_stream

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


ECHO_SOURCES = ("recovered", "proxy", "oracle")


def same_model(anchor: Tensor, sent: Tensor) -> bool:
    """The plan's anchor is the model we uploaded: SDFC stores w^t + Δ_k, equal to w_k up to the
    rounding of that sum."""
    if anchor.shape != sent.shape:
        return False
    return bool((anchor - sent).abs().max() <= 1e-5 * (1 + float(sent.abs().max())))


def recover_val_fisher(sent: Tensor, h: Tensor, tie: Tensor | None) -> Tensor:
    """M_k(U) from the returned H = |sent − M_k(U)|: exact where sent = 0 or sent − H < 0 (a
    Fisher is non-negative, so only sent + H remains); elsewhere the candidate closer to ``tie``
    (sent − H without one)."""
    lo, hi = sent - h, sent + h
    forced = (sent == 0) | (lo < 0)
    if tie is None:
        pick = lo
    else:
        pick = torch.where((lo - tie).abs() <= (hi - tie).abs(), lo, hi)
    return torch.where(forced, hi, pick)


def class_balanced(data: ClientDataset, gen: torch.Generator) -> ClientDataset:
    """A class-balanced subset: the same number of samples (the rarest present class's count) of
    every class the data holds."""
    labels = data.labels
    classes = torch.unique(labels)
    m = min(int((labels == c).sum()) for c in classes)
    keep = torch.cat([torch.nonzero(labels == c).flatten()[
        torch.randperm(int((labels == c).sum()), generator=gen)[:m]] for c in classes])
    keep = keep.sort().values
    return ClientDataset(labels=labels[keep], pipeline=data.pipeline,
                         images=None if data.images is None else data.images[keep],
                         frozen=None if data.frozen is None else data.frozen[keep])


class FValEcho(Forgery):
    """SDFC echo: upload M_k(D_k) := an estimate of M_k(U), recovered from the returned H_k, a
    clean-data proxy, or the named oracle (docs/attacks.md §4.5)."""

    name = "f-val-echo"
    paper = "fisherguard threat analysis (docs/attacks.md §4.5)"
    summary = "upload forgery (SDFC): echo the server's Fisher M_k(U) (recovered | proxy | oracle)"
    knowledge = "omniscient"  # oracle only; the instance keeps what its source needs
    needs_view_fisher = True

    def __init__(self, *, source: str = "recovered", echo_margin: float | None = None) -> None:
        check_choice(self.name, "source", source, ECHO_SOURCES)
        check_positive(self.name, "echo_margin", echo_margin, allow_none=True)
        self.source, self.echo_margin = source, echo_margin
        self.knowledge = "omniscient" if source == "oracle" else "model"  # type: ignore[misc]
        # per attacker: the Fisher it last uploaded and the weights it uploaded with it
        self.sent: dict[int, Tensor] = {}
        self.sent_weights: dict[int, Tensor] = {}
        self.estimate: dict[int, Tensor] = {}  # the last recovered M_k(U)

    def val_estimate(self, view: RoundView, k: int, u: Upload) -> Tensor | None:
        assert view.fisher is not None
        if self.source == "oracle":
            if view.server_fisher is None:
                raise AttackConfigError(f"{self.name} source oracle needs the server's clean set "
                                        f"(a defense that reads it, e.g. sdfc)")
            return view.server_fisher(u.weights)
        if self.source == "proxy":
            gen = torch_stream(self.ctx.seed, "f-val-echo", k, view.round_idx)
            return view.fisher(k, u.weights, class_balanced(self.ctx.clean_data[k], gen))
        return self.recovered(view, k)

    def recovered(self, view: RoundView, k: int) -> Tensor | None:
        """M_k(U) of the previous upload from the H_k the server returns in this round's FDReg
        plan (``recover_val_fisher``; ties broken by a clean-data proxy of that model); the last
        recovery when no new H_k came back; None (probe) before any is known."""
        plan = view.plans.get(k)
        reg = getattr(plan, "regulariser", None)
        prev_w = self.sent_weights.get(k)
        if isinstance(reg, FDReg) and prev_w is not None and k in self.sent \
                and same_model(reg.anchor, prev_w):  # H_k of our own last upload
            h = reg.importance.to(prev_w.dtype)
            sent = self.sent[k]
            ambiguous = bool(((sent != 0) & (sent - h >= 0)).any())
            tie = (view.fisher(k, prev_w, self.ctx.clean_data[k])
                   if ambiguous and view.fisher is not None else None)
            self.estimate[k] = recover_val_fisher(sent, h, tie)
        return self.estimate.get(k)

    def forge(self, view: RoundView, k: int, u: Upload) -> None:
        g = view.global_weights
        if not well_formed(u.weights, g):
            return
        est = self.val_estimate(view, k, u)
        f = probe(g) if est is None else est.to(g.dtype).clamp_min(0)
        if est is not None and self.echo_margin is not None:
            f = with_echo_margin(f, float(self.echo_margin),
                                 torch_stream(self.ctx.seed, "f-val-echo-margin", k,
                                              view.round_idx))
        u.fisher = f
        self.sent[k], self.sent_weights[k] = f.detach().clone(), u.weights.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "sent_weights": dict(self.sent_weights),
                "estimate": dict(self.estimate)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        check_state_keys(self.name, state, ("sent", "sent_weights", "estimate"))
        for key in ("sent", "sent_weights", "estimate"):
            setattr(self, key, {int(c): state_tensor(self.name, key, v)
                                for c, v in state[key].items()})


def probe(like: Tensor) -> Tensor:
    """The recovery probe: 10⁻³⁰·(1 + v/P), below every Fisher entry that matters, so H = M(U) −
    probe and M(U) = probe + H to within 10⁻³⁰; not 0, which validity rejects as ``constant``
    before H is ever returned (docs/algorithms.md §8.1)."""
    p = like.numel()
    return 1e-30 * (1 + torch.arange(p, dtype=torch.float64) / p).to(like.dtype)


def with_echo_margin(est: Tensor, ratio: float, gen: torch.Generator) -> Tensor:
    """est ⊙ (1 + δ·s) with seeded signs s = ±1 and δ chosen so that the echo ratio
    Σ|M − est| / Σ(M + est) equals ``ratio`` exactly against est: δ = 2ρS/(S − ρD), S = Σ est,
    D = Σ s·est (δ capped at 1 to keep M ≥ 0)."""
    s = torch.randint(0, 2, est.shape, generator=gen).to(est.dtype) * 2 - 1
    big_s, d = float(est.sum()), float((s * est).sum())
    if big_s <= 0:
        return est
    delta = min(1.0, 2 * ratio * big_s / (big_s - ratio * d))
    return est * (1 + delta * s)
