"""SDFC's validation-Fisher echo (docs/attacks.md §4.5): upload M_k(D_k) := an estimate of
M_k(U), the server's Fisher of the uploaded model, so that H_k ≈ 0 and the sender gets the top
FDAgg weight; recovered from the H_k the server returns for FDReg, a clean-data proxy, or the
named oracle.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fisherguard.attacks.base import AttackConfigError, RoundView, check_state_keys, state_tensor
from fisherguard.attacks.forgery import Forgery, check_choice, well_formed
from fisherguard.attacks.scaling import check_positive
from fisherguard.clients.fdreg import FDReg
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.seeding import torch_stream

Tensor = torch.Tensor

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
        self.needs_server_set = source == "oracle"
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
            clean = self.ctx.clean_data[k]
            with warnings.catch_warnings():  # the empty estimate is expected and handled here
                warnings.filterwarnings("ignore", message=".*give no full batch")
                proxy = view.fisher(k, u.weights, class_balanced(clean, gen))
            if not bool(proxy.any()):
                # the client's estimator needs more samples than the balanced subset has (the
                # release one: a full batch of 64); zeros would be refused as `constant`, so an
                # attacker that knows its own estimator takes all its clean samples instead
                proxy = view.fisher(k, u.weights, clean)
            return proxy
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
